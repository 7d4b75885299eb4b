"""Which layers tolerate what: compress one layer (or one layer type across blocks) at a time, measure WER."""
from __future__ import annotations

import re

from asr_core.errors import SettingsError
from asr_core.evaluation import evaluate
from asr_core.transcribe import Transcriber

from .artifact import to_runtime
from .compress import apply_recipe
from .methods import target_layers
from .recipe import Recipe, parse_recipe


def layer_groups(model, skip, by: str) -> dict[str, tuple[str, ...]]:
    """{label: name patterns}: one group per layer (``by="layer"``) or per layer type across blocks."""
    names = [name for name, _ in target_layers(model, skip)]
    if by == "layer":
        return {n: (n,) for n in names}
    groups: dict[str, tuple[str, ...]] = {}
    for n in names:
        kind = re.sub(r"^blocks\.\d+\.", "blocks.*.", n)
        groups.setdefault(kind, (kind,))
    return groups


def sensitivity(model, tokenizer, utterances, method: str, *, by: str = "type",
                progress: bool = True, stats=None) -> list[dict]:
    """Rows of {group, wer, delta_wer} for ``method`` (one inline method) applied to one group at a time."""
    base_recipe = parse_recipe(method)
    if len(base_recipe.steps) != 1:
        raise SettingsError("sensitivity takes one method, e.g. 'int4:group=64' or 'prune:sparsity=0.7'")
    baseline = evaluate(Transcriber(model, tokenizer), utterances, progress=False)["wer"]
    rows = [{"group": "(none: baseline)", "wer": baseline, "delta_wer": 0.0}]
    for label, patterns in layer_groups(model, base_recipe.skip, by).items():
        recipe = Recipe(base_recipe.steps, base_recipe.skip, only=patterns)
        compressed = to_runtime(apply_recipe(model, recipe, stats=stats))
        wer = evaluate(Transcriber(compressed, tokenizer), utterances, progress=False)["wer"]
        rows.append({"group": label, "wer": wer, "delta_wer": wer - baseline})
        if progress:
            print(f"{label:40s} WER {wer:.2%} ({wer - baseline:+.2%})", flush=True)
    return rows
