"""The studio's model side: the baseline, a bounded cache of compressed variants built on demand (each saved
as an artifact and loaded back, so it runs what a device would load), and how one clip is measured on each.
``app.py`` holds the page; everything here is usable (and tested) without gradio.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from asr_core.audio import SAMPLE_RATE, load_audio
from asr_core.beam_search import has_lm
from asr_core.checkpoint import default_model_dir, folder_bytes, load_model, save_model
from asr_core.errors import SettingsError
from asr_core.evaluation import error_rates, timed_decode
from asr_core.text import normalize_text
from asr_core.transcribe import Transcriber, make_decoder
from compression.artifact import load_artifact, save_artifact
from compression.calibration import stats_for
from compression.compress import apply_recipe
from compression.inspect import capture, clip_features, clip_modules, inspect_variant
from compression.recipe import algorithms, naive_twin, parse_recipe

ASSETS = Path(__file__).resolve().parent / "assets"
MAX_SECONDS = float(os.environ.get("EDGE_ASR_MAX_SECONDS", 120))  # longer uploads are refused with a message
TIMED_RUNS = 3  # latency = median of up to this many runs, after one warm-up
# ... stopping once this much decoding has been timed: a slow decode (a badly damaged variant under the word LM
# takes seconds) is timed once, since its run-to-run noise is small beside it, and a knob change stays quick
TIMING_BUDGET_S = 1.0
# each variant is built by its method's calibrated algorithm (GPTQ, SparseGPT, ...) or its data-free twin
ALGORITHMS = ("calibrated", "naive")
# where a variant runs: in PyTorch (the artifact loaded back), or exported to ONNX (compression.export, with
# the artifact's own int8/int4 codes) and run by ONNX Runtime as the torch-free device runner would
RUNTIMES = {"torch": "PyTorch", "onnx": "ONNX Runtime"}
RAM_TIMEOUT_S = 120  # a RAM measurement (a fresh process: 1-3 s here) that takes longer is given up with a message
VIEWS_PER_VARIANT = 8  # class-view reports (clip, layer) kept with each variant
SWEEP_POINTS_KEPT = 500  # sweep points (a few numbers each) kept across sweeps


@dataclass(frozen=True)
class VariantSpec:
    """One row of the page: a compression method and the knob that sets it."""

    key: str
    label: str
    template: str  # recipe with {value} for the knob; "" for the baseline
    knob: str | None = None  # knob label
    minimum: float = 0
    maximum: float = 1
    step: float = 0.05
    default: float | None = None
    enabled: bool = True
    geometric: bool = False  # a sweep spaces its points by ratio (group sizes, cluster counts), not by difference

    def recipe(self, value, algorithm: str = "calibrated") -> str:
        """The recipe for this knob value; ``algorithm`` "naive" gives every step its data-free algorithm."""
        if algorithm not in ALGORITHMS:
            raise SettingsError(f"{self.label}: algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        if not self.template:
            return ""
        if algorithm == "naive":
            return naive_twin(self.recipe(value))
        if self.knob is None:
            return self.template
        if value is None or not (self.minimum <= float(value) <= self.maximum):
            raise SettingsError(f"{self.label}: {self.knob} must be between {self.minimum:g} and {self.maximum:g}, "
                                f"got {value}")
        value = int(value) if float(self.step).is_integer() else round(float(value), 4)
        return self.template.format(value=value)

    def sweep_values(self, points: int) -> list[float]:
        """``points`` knob values across the whole range, on the knob's step (fewer if the step allows fewer)."""
        if self.knob is None:
            raise SettingsError(f"{self.label} has no knob to sweep")
        if not 2 <= int(points) <= 50:
            raise SettingsError(f"a sweep takes 2 to 50 points, got {points}", setting="points")
        if self.geometric:
            raw = np.geomspace(max(self.minimum, self.step), self.maximum, int(points))
        else:
            raw = np.linspace(self.minimum, self.maximum, int(points))
        snapped = [min(self.maximum, max(self.minimum, round(v / self.step) * self.step)) for v in raw]
        return sorted({round(v, 4) for v in snapped})


VARIANTS = [
    VariantSpec("fp32", "FP32 (baseline)", ""),
    VariantSpec("int8", "INT8", "int8"),
    VariantSpec("int4", "INT4", "int4:group={value}", "group size", 16, 256, 16, 64, geometric=True),
    VariantSpec("ternary", "Ternary", "ternary", enabled=False),
    VariantSpec("prune", "Pruned (unstructured)", "prune:sparsity={value}", "sparsity", 0.0, 0.95, 0.05, 0.5),
    VariantSpec("nm", "Pruned 2:4 (N:M)", "prune:pattern=2:4", enabled=False),
    VariantSpec("structured", "Pruned (structured)", "structured:fraction={value}", "fraction removed", 0.0, 0.9,
                0.05, 0.3),
    VariantSpec("svd", "Low-rank (SVD)", "svd:energy={value}", "energy kept", 0.3, 1.0, 0.01, 0.9),
    VariantSpec("kmeans", "K-means clustering", "kmeans:clusters={value}", "clusters", 2, 256, 1, 16, geometric=True),
    VariantSpec("combined", "Combined", "prune:sparsity={value}+kmeans:clusters=16+int8", "sparsity", 0.0, 0.95,
                0.05, 0.5),
]
SPECS = {v.key: v for v in VARIANTS}


@dataclass
class Variant:
    recipe: str
    transcriber: Transcriber
    bytes_on_disk: int
    build_seconds: float
    algorithm: str = ""  # per step: gptq, sparsegpt, rtn, magnitude, ...
    folder: str = ""  # its artifact folder (the baseline: its fp32 folder)
    views: OrderedDict = field(default_factory=OrderedDict)  # (clip, layer) -> class-view report, recent last
    onnx: Transcriber | None = None  # the ONNX export of ``folder`` on ONNX Runtime, made on first use
    onnx_seconds: float = 0.0  # what the export took
    onnx_bytes: int = 0  # the export's size on disk
    ram_mb: dict = field(default_factory=dict)  # runtime -> peak resident MB (asr_core.memory), measured once

    @property
    def onnx_folder(self) -> str:
        return self.folder.rstrip("/") + ".onnx"

    def remove_files(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.rmtree(self.onnx_folder, ignore_errors=True)


class Studio:
    """The baseline, a bounded LRU cache of compressed variants, and the measurements the page shows."""

    def __init__(self, model_dir: str | None = None, *, cache_size: int = 10,
                 max_seconds: float = MAX_SECONDS, timed_runs: int = TIMED_RUNS, calib: str | None = None):
        self.model_dir = model_dir or default_model_dir()
        _refuse_onnx_baseline(self.model_dir)
        self.base, self.tokenizer = load_model(self.model_dir)
        self.threads = torch.get_num_threads()  # the entry point sets them (app.main: --threads)
        self.max_seconds, self.timed_runs = max_seconds, timed_runs
        self.cache_size = cache_size
        self.cache: OrderedDict[str, Variant] = OrderedDict()
        # one compression/measurement at a time, so timings stay honest; re-entrant, so a measurement can hold it
        # from fetching its variant to its last figure (no other request evicts the variant's files meanwhile)
        self.lock = threading.RLock()
        self.workdir = tempfile.mkdtemp(prefix="edge-asr-studio-")
        weakref.finalize(self, shutil.rmtree, self.workdir, True)  # artifacts and exports go with the studio
        self.peers: dict = {}  # peer name -> asr_core.peers.PeerEngine, loaded on first use
        self.peer_ram_mb: dict[str, float] = {}  # peer name -> peak resident MB, measured once
        self.builds = 0  # artifact folders made so far (their names)
        self.clip: tuple | None = None  # (digest, features, the baseline's capture) of the class view's last clip
        self.sweep_points: OrderedDict[tuple, dict] = OrderedDict()  # (recipe key, clips) -> point, bounded
        fp32_dir = os.path.join(self.workdir, "fp32")
        # the baseline's size is measured in fp32, as a file (int8=False: an int8-stored frozen part too)
        save_model(fp32_dir, self.base, self.tokenizer, int8=False)
        self.cache[""] = Variant("", Transcriber(self.base, self.tokenizer), folder_bytes(fp32_dir), 0.0,
                                 folder=fp32_dir)
        # one word-LM decoder for every variant (the LM ships with the baseline), so that rows differ only in
        # the acoustic model; None when the model folder has no lm.arpa.gz
        self.lm_decoder = make_decoder(self.tokenizer, self.model_dir, "lm") if has_lm(self.model_dir) else None
        # calibration statistics, once: every calibrated variant and knob change reuses them
        start = time.perf_counter()
        self.stats = stats_for(self.base, calib)
        self.calibration_seconds = time.perf_counter() - start

    @staticmethod
    def recipe_key(recipe: str) -> str:
        """The cache key of a recipe (its canonical description; "" for the baseline), without any lock."""
        return parse_recipe(recipe).describe() if recipe else ""

    def variant(self, recipe: str) -> Variant:
        """The compressed model for ``recipe`` (validated), built once and kept while recently used."""
        parsed = parse_recipe(recipe) if recipe else None
        key = parsed.describe() if parsed else ""
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
            variant = self._build(parsed)
            self.cache[key] = variant
            while len(self.cache) > self.cache_size:
                old_key = next(k for k in self.cache if k)  # never evict the baseline
                self.cache.pop(old_key).remove_files()
            return variant

    def _build(self, parsed) -> Variant:
        """Compress, save as an artifact, load it back (run what was saved: what a device would load)."""
        start = time.perf_counter()
        self.builds += 1
        folder = os.path.join(self.workdir, f"v{self.builds}")
        save_artifact(apply_recipe(self.base, parsed, stats=self.stats), folder, self.tokenizer, parsed.to_json())
        model = load_artifact(folder)
        return Variant(parsed.describe(), Transcriber(model, self.tokenizer), folder_bytes(folder),
                       time.perf_counter() - start, algorithms(parsed), folder)

    # -------------------------------------------------------------------------------------- the class view
    @staticmethod
    def digest(samples) -> str:
        """A clip's identity for the caches (its samples' SHA-1)."""
        return hashlib.sha1(np.ascontiguousarray(samples)).hexdigest()

    def _clip_capture(self, samples) -> tuple:
        """(digest, features, the baseline's capture) of a clip (None: the first calibration clip), kept for the
        last clip only: the baseline's run with every layer's input and output, which every variant reuses."""
        digest = "calibration:0" if samples is None else self.digest(samples)
        if self.clip is None or self.clip[0] != digest:
            feats = self.stats.calibration.features[0] if samples is None else clip_features(samples, self.base)
            self.clip = (digest, feats, capture(self.base, feats, clip_modules(self.base)))
        return self.clip

    def inspect(self, recipe: str, samples=None, layer: str | None = None) -> dict:
        """The class view of one variant (compression.inspect.inspect_variant's report) on a clip (None: the first
        calibration clip), with ``seconds`` it took; kept with the variant, so a layer or clip seen before comes
        back at once."""
        if not recipe:
            raise SettingsError("the baseline has nothing to inspect: choose a compressed variant")
        with self.lock:
            variant = self.variant(recipe)
            start = time.perf_counter()
            digest, feats, base_capture = self._clip_capture(samples)
            key = (digest, layer)
            if key not in variant.views:
                report = inspect_variant(self.base, variant.transcriber.model, variant.folder, self.tokenizer,
                                         feats, layer, base_capture)
                cfg = self.base.cfg.features
                report["clip"] = ("the first calibration clip (no clip on the page)" if samples is None else
                                  f"the clip on the page ({feats.shape[0] * cfg.hop_length / cfg.sample_rate:.1f} s)")
                variant.views[key] = report
                while len(variant.views) > VIEWS_PER_VARIANT:
                    variant.views.popitem(last=False)
            variant.views.move_to_end(key)
            return dict(variant.views[key], seconds=time.perf_counter() - start)

    def sweep_point(self, recipe: str, clips: list, clips_key: str) -> dict:
        """Greedy WER (the acoustic model alone) and size on disk of one recipe on ``clips`` [(samples,
        reference)], kept by (recipe, ``clips_key``). A variant not in the page's cache is built outside it and
        dropped after, so a sweep never evicts the page's rows."""
        key = (self.recipe_key(recipe), clips_key)
        if key in self.sweep_points:
            return dict(self.sweep_points[key], cached=True)
        with self.lock:
            variant = self.cache.get(key[0])
            transient = variant is None
            if transient:
                variant = self._build(parse_recipe(recipe))
            texts = [variant.transcriber.transcribe(samples) for samples, _ in clips]
        if transient:
            variant.remove_files()
        rates = error_rates([r for _, r in clips], texts)
        point = {"recipe": key[0], "algorithm": variant.algorithm, "wer": rates["wer"], "cer": rates["cer"],
                 "size_mb": variant.bytes_on_disk / 1e6, "build_seconds": variant.build_seconds}
        self.sweep_points[key] = point
        while len(self.sweep_points) > SWEEP_POINTS_KEPT:
            self.sweep_points.popitem(last=False)
        return dict(point, cached=False)

    def sweep_steps(self, spec: VariantSpec, points: int, clips: list, clips_key: str):
        """One method across ``points`` knob values, naive and calibrated, one :meth:`sweep_point` at a time
        (cached, so a repeated or overlapping sweep only builds what is new): yields the result so far after each
        point, so the page can draw the lines as they grow. A clip without a reference is scored against the
        baseline's own transcript."""
        values = spec.sweep_values(points)
        vs_baseline = any(not (r and normalize_text(r)) for _, r in clips)
        if vs_baseline:
            baseline = self.cache[""].transcriber
            clips = [(x, r if r and normalize_text(r) else baseline.transcribe(x)) for x, r in clips]
            clips_key += ":vs-baseline"
        start = time.perf_counter()
        jobs = [(algo, value) for algo in ALGORITHMS[::-1] for value in values]  # naive first: it builds fastest
        out = {"points": [], "baseline": self.sweep_point("", clips, clips_key), "knob": spec.knob,
               "label": spec.label, "total": len(jobs), "vs_baseline": vs_baseline}
        for algo, value in jobs:
            out["points"].append({**self.sweep_point(spec.recipe(value, algo), clips, clips_key), "value": value,
                                  "family": algo})
            out.update(seconds=time.perf_counter() - start, cached=sum(p["cached"] for p in out["points"]))
            yield out

    def sweep(self, spec: VariantSpec, points: int, clips: list, clips_key: str, progress=None) -> dict:
        """:meth:`sweep_steps` to the end; ``progress(share, desc=...)`` after each point."""
        for out in self.sweep_steps(spec, points, clips, clips_key):
            if progress is not None:
                progress(len(out["points"]) / out["total"], desc=f"{spec.label}: {len(out['points'])} of "
                                                                  f"{out['total']} points")
        return out

    def load_clip(self, audio) -> "numpy.ndarray":  # noqa: F821
        return load_audio(audio, max_seconds=self.max_seconds)

    def decoder_for(self, transcriber: Transcriber, use_lm: bool):
        """The shared word-LM decoder when asked for and available, else ``transcriber``'s greedy decoder."""
        return self.lm_decoder if use_lm and self.lm_decoder is not None else transcriber.greedy

    def runner(self, variant: Variant, runtime: str = "torch") -> Transcriber:
        """The variant's greedy transcriber on ``runtime``: the loaded artifact, or (``"onnx"``) its ONNX export
        on ONNX Runtime with the studio's threads, exported once (several seconds) and kept with the variant.
        Call with the lock held. SettingsError for an unknown runtime or when the onnx extra is missing."""
        _check_runtime(runtime)
        if runtime == "torch":
            return variant.transcriber
        if variant.onnx is None:
            from asr_core.onnx_model import load_onnx_folder
            from compression.export import export_onnx

            start = time.perf_counter()
            export_onnx(variant.folder, variant.onnx_folder, check=False)
            variant.onnx = Transcriber(load_onnx_folder(variant.onnx_folder, threads=self.threads), self.tokenizer)
            variant.onnx_seconds = time.perf_counter() - start
            variant.onnx_bytes = folder_bytes(variant.onnx_folder)
        return variant.onnx

    def ram_mb(self, variant: Variant, runtime: str = "torch") -> float:
        """Peak resident MB of loading the variant's folder on ``runtime`` and transcribing a 6 s clip, in a fresh
        process (asr_core.memory: what a device would need, not this server's share); about 1-3 s the first time,
        then kept with the variant. Call with the lock held, after :meth:`runner` for ONNX."""
        from asr_core.memory import peak_rss_mb

        if runtime not in variant.ram_mb:
            folder = variant.onnx_folder if runtime == "onnx" else variant.folder
            variant.ram_mb[runtime] = peak_rss_mb(folder, runtime, threads=self.threads,
                                                  timeout=RAM_TIMEOUT_S)["peak_mb"]
        return variant.ram_mb[runtime]

    def measure(self, recipe: str, samples, reference: str | None, use_lm: bool = True, runtime: str = "torch",
                ram: bool = False) -> dict:
        """Transcribe ``samples`` with one variant on ``runtime`` ("torch" or "onnx"): text, WER/CER (with a
        reference), latency, RTF, size on disk (of what that runtime loads: the artifact, or model.onnx), and
        with ``ram`` the peak resident memory (:meth:`ram_mb`; else None).

        Latency is :func:`asr_core.evaluation.timed_decode` (samples in memory -> text: features, model and
        decoder), as in ``edge-asr evaluate`` and the benchmark; one clip is noisier than a corpus, so it is the
        median of up to ``timed_runs`` runs after a warm-up of the model (:func:`median_seconds`).
        """
        _check_runtime(runtime)  # before any compression
        with self.lock:
            variant = self.variant(recipe)
            greedy = self.runner(variant, runtime)
            decoder = self.decoder_for(greedy, use_lm)
            transcriber = Transcriber(greedy.model, self.tokenizer, decoder=decoder)
            # warm-up of the acoustic model only: the decoder is Python with nothing to warm (the LM's score cache
            # is the shared decoder's, warm from the rows before), and a beam search over the LM is most of a
            # clip's decode (0.8 of 0.95 s on the 10.9 s clip), which a knob change would pay once more
            transcriber.log_probs(samples)
            texts: list[str] = []
            latency = median_seconds(lambda: _timed_text(transcriber, samples, texts), self.timed_runs)
            text = texts[0]
            ram_mb = self.ram_mb(variant, runtime) if ram else None
        onnx = runtime == "onnx"
        return _row(text, reference, latency, samples, variant.onnx_bytes if onnx else variant.bytes_on_disk,
                    recipe=variant.recipe,
                    build_seconds=variant.build_seconds + (variant.onnx_seconds if onnx else 0.0),
                    algorithm=variant.algorithm, runtime=runtime, ram_mb=ram_mb,
                    decoding="greedy" if decoder is greedy.greedy else "beam search + word LM")

    def measure_peer(self, name: str, samples, reference: str | None, ram: bool = False) -> dict:
        """A peer (asr_core.peers) on the clip, timed like :meth:`Studio.measure`; ``ram``: its peak resident
        memory measured the same way (a fresh process, kept once measured)."""
        from asr_core.memory import peak_rss_mb
        from asr_core.peers import load_peer

        with self.lock:
            if name not in self.peers:
                self.peers[name] = load_peer(name, torch.get_num_threads())
            engine = self.peers[name]
            text = engine.transcribe(samples)  # warm-up
            latency = median_seconds(lambda: _seconds(engine.transcribe, samples), self.timed_runs)
            if ram and name not in self.peer_ram_mb:
                self.peer_ram_mb[name] = peak_rss_mb(name, "peer", threads=self.threads,
                                                     timeout=RAM_TIMEOUT_S)["peak_mb"]
        return _row(text, reference, latency, samples, engine.bytes_on_disk, recipe="", build_seconds=0.0,
                    algorithm="peer", decoding=engine.note, runtime="peer",
                    ram_mb=self.peer_ram_mb.get(name) if ram else None)


def _refuse_onnx_baseline(model_dir: str) -> None:
    """The studio compresses its baseline, which needs the PyTorch weights: an exported ONNX folder is refused
    with the way to the same model on ONNX Runtime (its source folder, and the page's Runtime choice)."""
    from asr_core.onnx_model import is_onnx_folder, read_onnx_config

    if not is_onnx_folder(model_dir):
        return
    source = read_onnx_config(model_dir).get("onnx", {}).get("source")
    raise SettingsError(f"{model_dir} is an exported ONNX model: the studio compresses a PyTorch model folder. "
                        f"Start it on {'the folder it was exported from, ' + source if source else 'its source'} "
                        f"and pick Runtime: ONNX Runtime on the page (each variant is exported and run there)",
                        setting="model")


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise SettingsError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}", setting="runtime")


def _row(text: str, reference: str | None, latency: float, samples, size_bytes: int, **rest) -> dict:
    """One row of the page's table: transcript, WER/CER against the reference (None without one), latency,
    RTF, size; ``rest`` says what the row is (recipe, algorithm, decoding, build seconds)."""
    rates = error_rates([reference], [text]) if reference and normalize_text(reference) else None
    return {"transcript": text, "wer": rates["wer"] if rates else None, "cer": rates["cer"] if rates else None,
            "latency_ms": 1000 * latency, "rtf": latency / (len(samples) / SAMPLE_RATE), "size_mb": size_bytes / 1e6,
            **rest}


def median_seconds(time_once, runs: int, budget: float = TIMING_BUDGET_S) -> float:
    """Median of ``time_once()`` (seconds of one timed run) over up to ``runs`` runs, stopping once ``budget``
    seconds have been timed (at least one run)."""
    times: list[float] = []
    while len(times) < max(1, runs) and (not times or sum(times) < budget):
        times.append(time_once())
    return statistics.median(times)


def _timed_text(transcriber: Transcriber, samples, texts: list) -> float:
    """Seconds of one :func:`timed_decode`, its text appended to ``texts``."""
    text, _, seconds = timed_decode(transcriber, samples)
    texts.append(text)
    return seconds


def _seconds(run, *args) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def default_recipes() -> list[str]:
    """The recipe of every row at its default knob (calibrated): the standard set of compression.recipe."""
    return [spec.recipe(spec.default) for spec in VARIANTS[1:]]


class LiveSession:
    """One browser microphone stream: chunks at the browser's rate -> 16 kHz (a streaming resampler, so chunk
    edges leave no clicks) -> the streaming engine of one variant, run on a worker thread. The stream handler
    only queues audio and reads the latest captions: Gradio drops microphone chunks that arrive while a handler
    is still busy, so decoding in the handler would lose audio whenever a decode takes longer than a chunk."""

    def __init__(self, studio: "Studio", recipe: str, use_lm: bool):
        import queue

        from asr_core.streaming import StreamingRecognizer

        variant = studio.variant(recipe)
        self.key = (variant.recipe, use_lm)
        self.label = variant.recipe or "FP32 (baseline)"
        transcriber = Transcriber(variant.transcriber.model, studio.tokenizer,
                                  decoder=studio.decoder_for(variant.transcriber, use_lm))
        self.engine = StreamingRecognizer(transcriber)
        self.lock = studio.lock  # decodes take turns with the Compare tab's measurements
        self.resampler, self.rate = None, None
        self.earlier: list[str] = []  # lines committed by variants used before a switch
        self.last = None
        self.error: Exception | None = None
        self.blocks: "queue.Queue[np.ndarray | None]" = queue.Queue()
        self.worker = threading.Thread(target=self._run, daemon=True)
        self.worker.start()

    def _run(self) -> None:
        while True:
            block = self.blocks.get()
            if block is None:
                return
            try:
                while not self.blocks.empty() and self.blocks.queue[0] is not None:  # catch up in one decode
                    block = np.concatenate([block, self.blocks.get()])
                with self.lock:
                    update = self.engine.feed(block)
                if update is not None:
                    self.last = update
            except Exception as err:  # noqa: BLE001 - reported by the next handler call
                self.error = err

    def add(self, rate: int, chunk) -> None:
        """A (rate, samples) chunk as Gradio streams it (int16 or float, mono or (frames, channels))."""
        import soxr

        if self.error is not None:
            raise self.error
        samples = np.asarray(chunk)
        if samples.size == 0:  # an empty chunk (the stream starting or stopping): nothing to hear
            return
        if samples.dtype.kind == "i":
            samples = samples.astype(np.float32) / np.iinfo(samples.dtype).max
        samples = samples.astype(np.float32).reshape(len(samples), -1).mean(axis=1)
        if rate != SAMPLE_RATE:
            if self.resampler is None or self.rate != rate:
                self.resampler, self.rate = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32"), rate
            samples = self.resampler.resample_chunk(samples)
        self.blocks.put(samples)

    def finish(self):
        """Wait for the queued audio to be decoded, then commit what is left."""
        self.blocks.put(None)
        self.worker.join()
        with self.lock:
            self.last = self.engine.finish()
        return self.last

    def captions(self) -> str:
        lines = [*self.earlier, *(self.last.committed if self.last else [])]
        partial = self.last.partial if self.last else ""
        return "\n".join([*lines[-200:], partial]).strip()
