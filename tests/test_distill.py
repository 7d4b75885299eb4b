"""Knowledge distillation from the uncompressed model: the KL loss itself, recovery of compressed tiny models with
their constraints intact, and audio without transcripts (tiny random models, synthetic clips: seconds)."""
import copy

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from asr_core.config import preset
from asr_core.data import SpeechDataset, Utterance, collate, read_audio_files
from asr_core.errors import SettingsError
from asr_core.model import ConformerCTC
from asr_core.text import CharTokenizer
from asr_core.training import BlockOutputs, TrainConfig, distill_loss, hidden_distill_loss, train
from compression.artifact import to_runtime
from compression.compress import apply_recipe, finetune
from compression.methods import Clustered, Mask, constraints, round_row_centroids, target_layers
from compression.quantize import element_scales, round_with_scales
from compression.recipe import parse_recipe
from conftest import speechlike


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return ConformerCTC(preset("tiny", dropout=0.0)).eval()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A plain folder of audio, no transcripts: read_audio_files gives every clip the text ""."""
    folder = tmp_path_factory.mktemp("clips")
    for i in range(3):
        sf.write(folder / f"clip{i}.wav", speechlike(1.0, seed=i), 16000, subtype="PCM_16")
    utts = read_audio_files(str(folder))
    assert len(utts) == 3 and all(u.text == "" for u in utts)
    return utts


def fixed_batch_kl(student, teacher, utts) -> float:
    """Distillation loss on one fixed batch: no speed change, no SpecAugment, both in eval mode."""
    batch = collate([SpeechDataset(utts, teacher.cfg.features, CharTokenizer())[i] for i in range(len(utts))])
    with torch.no_grad():
        s, lengths = student.eval()(batch["features"], batch["lengths"])
        t, _ = teacher.eval()(batch["features"], batch["lengths"])
    return float(distill_loss(s, t, lengths))


def parametrized(model):
    return [(name, m) for name, m in target_layers(model) if constraints(m)]


def test_distill_loss_zero_positive_and_blind_to_padding():
    torch.manual_seed(0)
    student = F.log_softmax(torch.randn(2, 7, 5), dim=-1)
    teacher = F.log_softmax(torch.randn(2, 7, 5), dim=-1)
    lengths = torch.tensor([7, 4])
    assert float(distill_loss(teacher, teacher, lengths)) == 0.0
    assert float(distill_loss(student, teacher, lengths)) > 0
    for temperature in (1.0, 2.0):  # the formula: mean over the 11 valid frames of T^2 KL(softened teacher || student)
        s, t = (F.log_softmax(x / temperature, dim=-1) for x in (student, teacher))
        kl = (t.exp() * (t - s)).sum(-1)
        expected = temperature ** 2 * (kl[0].sum() + kl[1, :4].sum()) / 11
        assert torch.allclose(distill_loss(student, teacher, lengths, temperature), expected)
    # padded frames (utterance 1 past frame 4) may hold anything, even inf/nan: the loss does not change
    student2, teacher2 = student.clone(), teacher.clone()
    student2[1, 4:] = float("nan")
    teacher2[1, 4:] = -float("inf")
    assert torch.equal(distill_loss(student2, teacher2, lengths), distill_loss(student, teacher, lengths))


def test_hidden_distill_loss_relative_per_block_and_blind_to_padding():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 6, 4), 10 * torch.randn(2, 6, 4)]  # a later block's residual stream is larger
    lengths = torch.tensor([6, 3])
    assert float(hidden_distill_loss(teacher, teacher, lengths)) == 0.0
    student = [t + 0.1 * torch.randn_like(t) * t.abs().mean() for t in teacher]
    valid = [t[0].pow(2).sum() + t[1, :3].pow(2).sum() for t in teacher]
    errors = [(s - t)[0].pow(2).sum() + (s - t)[1, :3].pow(2).sum() for s, t in zip(student, teacher)]
    expected = (errors[0] / valid[0] + errors[1] / valid[1]) / 2
    assert torch.allclose(hidden_distill_loss(student, teacher, lengths), expected)
    # both blocks are off by the same share of their size, so neither outweighs the other
    assert 0.3 < float(errors[0] / valid[0]) / float(errors[1] / valid[1]) < 3
    padded = [s.clone() for s in student]
    padded[1][1, 3:] = float("nan")
    assert torch.equal(hidden_distill_loss(padded, teacher, lengths), hidden_distill_loss(student, teacher, lengths))
    with pytest.raises(SettingsError, match="same blocks"):
        hidden_distill_loss(student[:1], teacher, lengths)
    with pytest.raises(SettingsError, match="width"):
        hidden_distill_loss([s[..., :3] for s in student], teacher, lengths)


def block_error(student, teacher, utts) -> float:
    """Layer-matching loss on one fixed batch, both models in eval mode."""
    batch = collate([SpeechDataset(utts, teacher.cfg.features, CharTokenizer())[i] for i in range(len(utts))])
    taps = BlockOutputs(student), BlockOutputs(teacher)
    try:
        with torch.no_grad():
            _, lengths = student.eval()(batch["features"], batch["lengths"])
            teacher.eval()(batch["features"], batch["lengths"])
        return float(hidden_distill_loss(taps[0].take(), taps[1].take(), lengths))
    finally:
        for t in taps:
            t.remove()


def test_layer_matching_lowers_every_blocks_error_and_leaves_no_hooks(teacher, clips):
    student = apply_recipe(teacher, parse_recipe("structured:fraction=0.5"))
    plain = copy.deepcopy(student)
    before, kl_before = block_error(student, teacher, clips), fixed_batch_kl(student, teacher, clips)
    assert before > 0.01
    summary = finetune(student, CharTokenizer(), clips, [], steps=20, lr=3e-4, batch_seconds=100, teacher=teacher,
                       distill=True, progress=False, hidden_weight=1.0)
    finetune(plain, CharTokenizer(), clips, [], steps=20, lr=3e-4, batch_seconds=100, teacher=teacher,
             distill=True, progress=False)
    after, after_plain = block_error(student, teacher, clips), block_error(plain, teacher, clips)
    assert summary["hidden_weight"] == 1.0
    assert after < 0.5 * before, (before, after)
    assert after < after_plain, (after, after_plain)  # matching the blocks is what lowered their error
    assert fixed_batch_kl(student, teacher, clips) < kl_before  # and the posteriors came closer too
    # the teacher is usually the app's base model: no hook of the run may stay on it (or on the student)
    for model in (teacher, student):
        assert not any(block._forward_hooks for block in model.blocks)


def check_prune(student, before):
    for name, m in parametrized(student):
        mask = next(p.mask for p in constraints(m) if isinstance(p, Mask))
        assert torch.equal(mask, before[name]), name  # the same mask
        assert not m.weight[~mask].any(), name
        assert not to_runtime(student).get_submodule(name).weight[~mask].any(), name


def check_kmeans(student, _):
    runtime = to_runtime(student)
    for name, m in parametrized(student):
        clustered = next(p for p in constraints(m) if isinstance(p, Clustered))
        codebook = clustered.codebook.detach()
        if codebook.dim() == 2:  # each row's values in its own codebook, as stored (a 256-level grid or fp16)
            codebook = round_row_centroids(codebook, clustered.row_centroids)
        for w in (m.weight.detach(), runtime.get_submodule(name).weight):
            rows = w.reshape(w.shape[0], -1)
            if codebook.dim() == 2:
                assert all(torch.isin(r, c).all() for r, c in zip(rows, codebook)), name
            else:
                assert torch.isin(rows, codebook).all(), name


def check_int4(student, _):
    runtime = to_runtime(student)
    for name, m in parametrized(student):
        w = runtime.get_submodule(name).weight.detach()
        w2 = w.reshape(w.shape[0], -1)
        fq = m.parametrizations.weight[-1]
        grid = element_scales(fq.scales, "int4", 16, w2.shape[1])  # GPTQ's searched scales, fixed while training
        assert torch.equal(round_with_scales(w2, fq.scales, "int4", 16).float() * grid, w2), name  # on its grid
        assert torch.allclose(m.weight.detach(), w, atol=1e-6), name  # what training saw is what ships


@pytest.mark.parametrize("recipe_text, check", [("prune:sparsity=0.5", check_prune),
                                                 ("kmeans:clusters=4", check_kmeans),
                                                 ("int4:group=16", check_int4)])
def test_distillation_recovers_and_keeps_constraints(teacher, clips, recipe_text, check):
    student = apply_recipe(teacher, parse_recipe(recipe_text))
    masks = {name: m.parametrizations.weight[0].mask.clone() for name, m in parametrized(student)
             if isinstance(m.parametrizations.weight[0], Mask)}
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    kl_before = fixed_batch_kl(student, teacher, clips)
    finetune(student, CharTokenizer(), clips, [], steps=20, lr=3e-4, batch_seconds=100, teacher=teacher,
             distill=True, progress=False)
    kl_after = fixed_batch_kl(student, teacher, clips)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    assert any(not torch.equal(weights[k], v) for k, v in student.state_dict().items())  # it did train
    check(student, masks)
    # the teacher is unchanged and given back as it came: later compressions copy it and must be trainable
    assert all(torch.equal(teacher_weights[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_teacher_sees_the_students_augmented_features(teacher, clips):
    seen = {"student": [], "teacher": []}
    student = apply_recipe(teacher, parse_recipe("prune:sparsity=0.5"))
    hooks = [m.register_forward_pre_hook(lambda _, args, who=who: seen[who].append(args[0].clone()))
             for who, m in (("student", student), ("teacher", teacher))]
    cfg = TrainConfig(lr=3e-4, warmup_steps=1, max_steps=2, batch_seconds=100, spec_augment=True,
                      distill_weight=1.0, ctc_weight=0.0)
    try:
        train(student, CharTokenizer(), clips, [], cfg, None, progress=False, teacher=teacher)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen["student"]) == len(seen["teacher"]) == 2
    assert all(torch.equal(s, t) for s, t in zip(seen["student"], seen["teacher"]))


def test_audio_without_transcripts(teacher, clips):
    student = apply_recipe(teacher, parse_recipe("prune:sparsity=0.5"))
    summary = finetune(student, CharTokenizer(), clips, [], steps=2, lr=3e-4, batch_seconds=100, teacher=teacher,
                       distill=True, progress=False)
    assert summary["step"] == 2
    with pytest.raises(SettingsError, match="no transcripts"):
        finetune(student, CharTokenizer(), clips, [], steps=2, teacher=teacher, distill=True, ctc_weight=0.5,
                 progress=False)
    with pytest.raises(SettingsError, match="no transcripts"):  # plain CTC fine-tuning on it would learn blanks
        finetune(student, CharTokenizer(), clips, [], steps=2, progress=False)
    # with transcripts, CTC can be added to the KL
    labelled = [Utterance(u.id, u.audio_path, "a b", u.duration) for u in clips]
    summary = finetune(student, CharTokenizer(), labelled, [], steps=2, lr=3e-4, batch_seconds=100,
                       teacher=teacher, distill=True, ctc_weight=0.5, progress=False)
    assert summary["step"] == 2


def test_bad_distillation_settings_fail_before_work(teacher):
    student = apply_recipe(teacher, parse_recipe("prune:sparsity=0.5"))
    for cfg, who, message in [
        (TrainConfig(distill_weight=1.0), None, "teacher"),
        (TrainConfig(distill_weight=0.0), teacher, "teacher"),
        (TrainConfig(distill_weight=1.0, ctc_weight=-1.0), teacher, "negative"),
        (TrainConfig(distill_weight=-1.0), teacher, "negative"),
        (TrainConfig(ctc_weight=0.0), None, "both 0"),
        (TrainConfig(distill_weight=1.0, distill_temperature=0.0), teacher, "temperature"),
        (TrainConfig(distill_weight=1.0), student, "shares parameters"),
        (TrainConfig(distill_weight=1.0, distill_hidden_weight=-1.0), teacher, "negative"),
        (TrainConfig(ctc_weight=1.0, distill_hidden_weight=1.0), None, "needs a teacher"),
    ]:
        with pytest.raises(SettingsError, match=message):
            train(student, CharTokenizer(), [], [], cfg, None, progress=False, teacher=who)
    with pytest.raises(SettingsError, match="needs a teacher"):
        finetune(student, CharTokenizer(), [], [], steps=1, distill=True, progress=False)
    with pytest.raises(SettingsError, match="ctc_weight"):
        finetune(student, CharTokenizer(), [], [], steps=1, ctc_weight=0.5, progress=False)
    with pytest.raises(SettingsError, match="distillation only"):
        finetune(student, CharTokenizer(), [], [], steps=1, hidden_weight=1.0, progress=False)
    shallower = copy.deepcopy(teacher)
    del shallower.blocks[-1]
    with pytest.raises(SettingsError, match="as many blocks"):
        train(student, CharTokenizer(), [], [], TrainConfig(distill_weight=1.0, distill_hidden_weight=1.0), None,
              progress=False, teacher=shallower)


def dropout_rates(model) -> list[float]:
    return [m.p if isinstance(m, torch.nn.Dropout) else m.dropout for m in model.modules()
            if isinstance(m, torch.nn.Dropout) or isinstance(getattr(m, "dropout", None), (int, float))]


@pytest.mark.parametrize("asked, expected", [(None, 0.0), (0.05, 0.05)])
def test_distillation_trains_the_student_without_dropout_unless_asked(teacher, clips, asked, expected):
    student = apply_recipe(teacher, parse_recipe("prune:sparsity=0.5"))
    for m in student.modules():  # the tiny teacher has none: give the student the shipped model's 0.1
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.1
    student.blocks[0].attn.dropout = 0  # as a hand-written config.json may give it: an int
    own = dropout_rates(student)
    assert len(own) > 4 and set(own) == {0.1, 0}
    during = []
    summary = finetune(student, CharTokenizer(), clips, [], steps=2, lr=3e-4, batch_seconds=100, teacher=teacher,
                       distill=True, progress=False, dropout=asked,
                       on_step=lambda state: during.append(dropout_rates(student)))
    assert len(during) == 2 and all(rate == expected for rates in during for rate in rates)
    assert dropout_rates(student) == own  # the model keeps its own rates afterwards
    assert summary["dropout"] == expected
    with pytest.raises(SettingsError, match="dropout"):
        finetune(student, CharTokenizer(), clips, [], steps=1, teacher=teacher, distill=True, progress=False,
                 dropout=1.5)


@pytest.mark.parametrize("distill, asked, expected", [(True, None, False), (True, True, True), (False, None, True)])
def test_distillation_trains_on_the_audio_as_it_is_unless_asked(teacher, clips, monkeypatch, distill, asked,
                                                                 expected):
    import asr_core.training as training

    masked, speeds = [], []
    real_augment, real_dataset = training.spec_augment, training.SpeechDataset

    def counting_augment(*args, **kwargs):
        masked.append(1)
        return real_augment(*args, **kwargs)

    def recording_dataset(*args, speed_factors=(1.0,), **kwargs):
        speeds.append(tuple(speed_factors))
        return real_dataset(*args, speed_factors=speed_factors, **kwargs)

    monkeypatch.setattr(training, "spec_augment", counting_augment)
    monkeypatch.setattr(training, "SpeechDataset", recording_dataset)
    student = apply_recipe(teacher, parse_recipe("prune:sparsity=0.5"))
    data = clips if distill else [Utterance(u.id, u.audio_path, "a b", u.duration) for u in clips]
    summary = finetune(student, CharTokenizer(), data, [], steps=2, lr=3e-4, batch_seconds=100,
                       teacher=teacher if distill else None, distill=distill, progress=False, augment=asked)
    assert summary["augment"] is expected
    assert (len(masked) == 2) if expected else not masked  # SpecAugment once per step, or never
    assert speeds[0] == (TrainConfig.speed_factors if expected else (1.0,))
