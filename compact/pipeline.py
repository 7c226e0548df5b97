"""The pruning job: calibrate -> score -> select -> slice -> save, with timings and checks for the report."""
from __future__ import annotations

import platform
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__, budget, criteria, data, models, output, runs, selection, slicing, tokenizer, vocab
from .loading import Loaded
from .scoring import score_channels


class CheckFailed(RuntimeError):
    """--check found the fused scores off the hook reference."""


CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class CalibOptions:
    path: str | None = None
    samples: int = 16
    seq_len: int = 2048
    bin_dtype: str | None = None


@dataclass
class PruneOptions:
    vocab_keep: int | None = None
    ffn_keep: str | None = None
    target_params: float | None = None
    vocab_order: str = "id"
    vocab_always: str | None = None
    ffn_multiple: int = 64
    ffn_criterion: str = "common-act2"
    seed: int = 0
    scores: str | None = None
    batch_size: int = 1
    check: bool = False
    check_batches: int = 2
    overwrite: bool = False
    progress: bool | None = None


class Timings(dict):
    """Seconds per phase, in the order the phases ran."""

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self[name] = round(self.get(name, 0.0) + time.perf_counter() - start, 4)


def calibrate(loaded: Loaded, opts: CalibOptions, progress: bool | None = None) -> data.Calibration:
    """Calibration sequences for the model, seq_len capped at its context."""
    if opts.path is None:
        raise ValueError("this needs calibration data: pass --calib PATH")
    model = loaded.model
    context = getattr(model.config, "max_position_embeddings", None) or opts.seq_len
    eos = getattr(loaded.tokenizer, "eos_token_id", None) if loaded.tokenizer else model.config.eos_token_id
    # Token-id data for a pruned model holds the original ids: map them through kept_token_ids.
    report = loaded.report if Path(opts.path).suffix in data.ID_SUFFIXES else None
    remap = report["kept_token_ids"] if report else None
    calib = data.load_calibration(
        opts.path, tokenizer=loaded.tokenizer,
        vocab_size=report["sizes"]["vocab_before"] if report else model.get_input_embeddings().num_embeddings,
        samples=opts.samples, seq_len=min(opts.seq_len, context), bin_dtype=opts.bin_dtype,
        eos_id=eos if isinstance(eos, int) and not remap else None, progress=progress)
    if remap:
        calib.input_ids = renumber(calib.input_ids, calib.attention_mask, remap, report["sizes"]["vocab_before"],
                                   opts.path)
    return calib


def renumber(input_ids: torch.Tensor, attention_mask, kept_token_ids: list[int], old_vocab: int, path) -> torch.Tensor:
    """Old token ids -> new ids of a vocabulary-pruned model; an error names a dropped id the data holds."""
    table = torch.full((old_vocab,), -1, dtype=torch.long)
    table[torch.tensor(kept_token_ids)] = torch.arange(len(kept_token_ids))
    new = table[input_ids]
    valid = torch.ones_like(new, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    dropped = (new < 0) & valid
    if dropped.any():
        raise ValueError(f"{path} holds token id {int(input_ids[dropped][0])}, which this pruned model's "
                         f"vocabulary dropped ({int(dropped.sum())} such positions)")
    return new.clamp_min(0)


def config_token_ids(model) -> list[int]:
    """The token ids the config or the generation config names (models.SPECIAL_ID_ATTRS): kept whatever the
    vocabulary cut, and renumbered by the same list (compact.slicing)."""
    ids = []
    for config in (model.config, getattr(model, "generation_config", None)):
        for attr in models.SPECIAL_ID_ATTRS:
            value = getattr(config, attr, None)
            ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return ids


VOCAB_ORDERS = ("id", "frequency")


def regular_ids(loaded: Loaded) -> list[int]:
    """Ids of the regular (non-special) tokens that have embedding rows, ascending."""
    rows = loaded.model.get_input_embeddings().num_embeddings
    if loaded.tokenizer is None:
        return list(range(rows))
    specials = set(tokenizer.special_token_ids(loaded.tokenizer))
    return sorted(i for i in loaded.tokenizer.get_vocab().values() if i < rows and i not in specials)


def token_counts(loaded: Loaded, calib_opts: CalibOptions, progress: bool | None = None) -> torch.Tensor:
    """Token frequencies over the whole calibration file, streamed."""
    if calib_opts.path is None:
        raise ValueError("--vocab-order frequency and --target-params need calibration data: pass --calib PATH")
    rows = loaded.model.get_input_embeddings().num_embeddings
    chunks = data.stream(calib_opts.path, bin_dtype=calib_opts.bin_dtype)
    return vocab.count_tokens(loaded.tokenizer, chunks, num_embeddings=rows, progress=progress)


def kept_vocabulary(loaded: Loaded, vocab_keep: int | None, *, order: str = "id", counts=None,
                    always=()) -> list[int] | None:
    """Ascending old ids to keep (id order: the lowest regular ids; frequency order: the most frequent,
    closed under merge ancestry), or None when the vocabulary is not cut."""
    if order not in VOCAB_ORDERS:
        raise ValueError(f"--vocab-order must be one of {', '.join(VOCAB_ORDERS)}, got {order!r}")
    if vocab_keep is None:
        if always:
            raise ValueError("--vocab-always names tokens to keep when the vocabulary is cut: give --vocab-keep "
                             "(or --target-params)")
        return None
    rows = loaded.model.get_input_embeddings().num_embeddings
    extra = config_token_ids(loaded.model)
    if order == "frequency":
        return vocab.select_vocab_by_frequency(loaded.tokenizer, rows, vocab_keep, counts, always=always,
                                               extra_ids=extra)
    kept = vocab.select_vocab(loaded.tokenizer, rows, vocab_keep, extra_ids=extra, always=always)
    if loaded.tokenizer is None:
        warnings.warn("no tokenizer: id order assumes later ids are rarer, which need not hold here "
                      "(SentencePiece puts its 256 byte pieces first); --vocab-order frequency measures it",
                      stacklevel=2)
    return kept


def plain_scores(loaded: Loaded, calib: data.Calibration, opts: PruneOptions) -> dict:
    """act^2 over all calibration tokens, the FFN evidence of the budget planner."""
    if loaded.offloaded:
        return _layerwise_scores(loaded, calib, None, PruneOptions(ffn_criterion="act2", batch_size=opts.batch_size,
                                                                   progress=opts.progress))[0]
    return criteria.activation_scores(loaded.model, calib.input_ids, calib.attention_mask, None,
                                      batch_size=opts.batch_size, progress=opts.progress)[1]


def plan_split(loaded: Loaded, counts: torch.Tensor, plain_scores: dict, opts: PruneOptions) -> tuple[int, int, dict]:
    """(vocab_keep, ffn_keep, plan report) for --target-params, by the rule in compact.budget."""
    regular = regular_ids(loaded)
    rows = loaded.model.get_input_embeddings().num_embeddings
    order = regular if opts.vocab_order == "id" else vocab.frequency_keep_order(loaded.tokenizer, rows, counts)
    forced = len(kept_vocabulary(loaded, len(regular), order=opts.vocab_order, counts=counts)) - len(regular)
    acc = budget.accounting(loaded.model, len(regular), forced)
    curve = budget.token_loss_curve(counts, order)
    choice, candidates = budget.plan(acc, opts.target_params, curve, plain_scores, opts.ffn_multiple)
    return choice.vocab_keep, choice.ffn_keep, {"target": opts.target_params, "rule": budget.RULE,
                                                 "candidates": budget.summary(choice, candidates)}


def check_against_hooks(score, calib: data.Calibration, *, batch_size: int, batches: int, dtype) -> dict:
    """`score(ids, mask, backend)` on the first batches, fused vs the plain hook path: the largest difference
    relative to each layer's maximum."""
    n = min(calib.input_ids.shape[0], batch_size * batches)
    mask = None if calib.attention_mask is None else calib.attention_mask[:n]
    runs_ = {backend: score(calib.input_ids[:n], mask, backend) for backend in ("fused", "hooks")}
    worst, where = 0.0, None
    for name, ref in runs_["hooks"].items():
        scale = ref.abs().max().clamp_min(1e-30)
        diff = float(((runs_["fused"][name] - ref).abs() / scale).max())
        if diff >= worst:
            worst, where = diff, name
    rtol = CHECK_RTOL[dtype]
    result = {"sequences": n, "max_rel_diff": worst, "worst_layer": where, "rtol": rtol, "ok": worst <= rtol}
    if not result["ok"]:
        raise CheckFailed(f"--check failed: fused scores differ from the hook reference by {worst:.3g} "
                          f"(relative to the layer maximum) in {where}, above {rtol:g}")
    return result


def _layerwise_scores(loaded: Loaded, calib: data.Calibration, kept_ids, opts: PruneOptions) -> tuple[dict, dict | None]:
    """common act^2 (or act^2) loading one layer at a time from the checkpoint files."""
    from .layerwise import score_layerwise

    if opts.ffn_criterion not in ("common-act2", "act2"):
        raise ValueError(f"--offload layerwise scores common-act2 and act2, not {opts.ffn_criterion}")
    keep = kept_ids if opts.ffn_criterion == "common-act2" else None
    dtype = loaded.model.get_input_embeddings().weight.dtype

    def score(ids, mask, backend, progress=False):
        return score_layerwise(loaded.source, ids, mask, keep_token_ids=keep, batch_size=opts.batch_size,
                               device=loaded.device, dtype=dtype, backend=backend, progress=progress)

    check = check_against_hooks(score, calib, batch_size=opts.batch_size, batches=opts.check_batches,
                                dtype=dtype) if opts.check else None
    return score(calib.input_ids, calib.attention_mask, "auto", opts.progress), check


def compute_scores(loaded: Loaded, calib: data.Calibration | None, kept_ids, opts: PruneOptions,
                   run: runs.RunOptions | None = None) -> tuple[dict, dict | None]:
    """(scores by `opts.ffn_criterion`, --check result or None); data-driven criteria share one pass.
    A skeleton model (loading.load_skeleton) is scored layer by layer from its files."""
    model = loaded.model
    if opts.ffn_criterion in criteria.DATA_FREE:
        if loaded.offloaded:
            raise ValueError(f"--ffn-criterion {opts.ffn_criterion} needs the weights: drop --offload layerwise")
        return criteria.data_free_scores(model, opts.ffn_criterion, opts.seed), None
    if loaded.offloaded:
        if run is not None and (run.every or run.resume or runs.distributed()[1] > 1):
            raise ValueError("--offload layerwise runs in one process without checkpoints")
        return _layerwise_scores(loaded, calib, kept_ids, opts)
    check = None
    if opts.check:
        def score(ids, mask, backend):
            return score_channels(model, ids, mask, keep_token_ids=kept_ids, batch_size=opts.batch_size,
                                  backend=backend, progress=False)

        check = check_against_hooks(score, calib, batch_size=opts.batch_size, batches=opts.check_batches,
                                    dtype=model.get_input_embeddings().weight.dtype)
    common, plain = criteria.activation_scores(model, calib.input_ids, calib.attention_mask, kept_ids,
                                               batch_size=opts.batch_size, progress=opts.progress, run=run)
    return criteria.from_activations(model, opts.ffn_criterion, common, plain), check


def versions() -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"compact": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version, "python": platform.python_version()}


def _resolve_targets(opts: PruneOptions, intermediate: int) -> int | None:
    """Validate what to prune; the FFN keep count (None when planned or not cut)."""
    if opts.target_params is not None and (opts.vocab_keep or opts.ffn_keep):
        raise ValueError("give --target-params, or --vocab-keep/--ffn-keep, not both")
    if opts.target_params is None and opts.vocab_keep is None and opts.ffn_keep is None:
        raise ValueError("nothing to prune: give --vocab-keep and/or --ffn-keep, or --target-params")
    criteria.check_criterion(opts.ffn_criterion)
    if opts.ffn_keep is None:
        return None if opts.target_params else intermediate
    return selection.resolve_ffn_keep(opts.ffn_keep, intermediate, opts.ffn_multiple)


def prune(loaded: Loaded, out: Path, opts: PruneOptions, calib_opts: CalibOptions,
          run: runs.RunOptions | None = None) -> dict:
    """Prune `loaded` (modified in place) and write the checkpoint, tokenizer, report and scores to `out`.
    A skeleton (loading.load_skeleton) is scored layer by layer and written tensor by tensor from its files."""
    model, timings = loaded.model, Timings()
    intermediate = models.intermediate_size(model)
    ffn_keep = _resolve_targets(opts, intermediate)
    vocab_keep, plan = opts.vocab_keep, None
    needs_counts = opts.vocab_order == "frequency" or opts.target_params is not None
    data_scores = opts.scores is None and opts.ffn_criterion not in criteria.DATA_FREE and (
        ffn_keep != intermediate or calib_opts.path is not None)
    calib = counts = None
    if data_scores or opts.target_params is not None:
        with timings.phase("calibration"):
            calib = calibrate(loaded, calib_opts, opts.progress)
    if needs_counts:
        with timings.phase("token counts"):
            counts = token_counts(loaded, calib_opts, opts.progress)
    if opts.target_params is not None:
        with timings.phase("planning"):
            vocab_keep, ffn_keep, plan = plan_split(loaded, counts, plain_scores(loaded, calib, opts), opts)
    always = vocab.read_always_file(opts.vocab_always) if opts.vocab_always else ()
    with timings.phase("vocabulary"):
        kept_ids = kept_vocabulary(loaded, vocab_keep, order=opts.vocab_order, counts=counts, always=always)
    before = models.parameter_counts(model)
    scores, check = None, None
    if opts.scores:
        scores = output.load_scores(opts.scores, {n: intermediate for n in models.mlps(model)},
                                    models.fingerprint(model.config))
    elif data_scores or ffn_keep != intermediate:
        with timings.phase("scoring"):
            scores, check = compute_scores(loaded, calib, kept_ids, opts, run)
    with timings.phase("selection"):
        kept_channels = selection.select_channels(scores, ffn_keep) if scores else \
            {name: list(range(intermediate)) for name in models.mlps(model)}
    report = _report(loaded, opts, calib_opts, calib, plan, check, before, kept_ids, kept_channels, ffn_keep, timings)
    _write(loaded, out, opts.overwrite, kept_ids, kept_channels if ffn_keep < intermediate else None, scores,
           report, timings, opts.progress)
    return report


def _report(loaded: Loaded, opts: PruneOptions, calib_opts: CalibOptions, calib, plan, check, before: dict,
            kept_ids, kept_channels: dict, ffn_keep: int, timings: Timings) -> dict:
    """compact_report.json, less the parameters after slicing (added by _write)."""
    model = loaded.model
    vocab_before = model.get_input_embeddings().num_embeddings
    return {
        "source": loaded.source, "calibration": calib.source if calib else None, "scores_file": opts.scores,
        "ffn_criterion": None if opts.scores else opts.ffn_criterion, "vocab_order": opts.vocab_order,
        "plan": plan, "offload": "layerwise" if loaded.offloaded else "none",
        "options": {**asdict(opts), **{f"calib_{k}": v for k, v in asdict(calib_opts).items()},
                    **_calib_used(calib)},
        "sizes": {"vocab_before": vocab_before, "vocab_after": len(kept_ids) if kept_ids else vocab_before,
                  "intermediate_before": models.intermediate_size(model), "intermediate_after": ffn_keep,
                  "layers": len(kept_channels), "hidden": model.config.hidden_size},
        "parameters": {"before": before},
        "checks": {"scores_vs_hooks": check}, "timings_s": timings, "versions": versions(),
        "kept_token_ids": kept_ids if kept_ids is not None else list(range(vocab_before)),
        "kept_channels": list(kept_channels.values()),
    }


def _calib_used(calib) -> dict:
    """The calibration shape really used (--seq-len is capped at the context, --samples at the data)."""
    if calib is None:
        return {}
    samples, seq_len = calib.input_ids.shape
    return {"calib_samples": samples, "calib_seq_len": seq_len}


def _write(loaded: Loaded, out: Path, overwrite: bool, kept_ids, channels, scores, report: dict,
           timings: Timings, progress) -> None:
    """Slice and save checkpoint, tokenizer, scores and report into a staged folder renamed to `out` at the end."""
    model = loaded.model
    shape = models.fingerprint(model.config)  # of the model the scores belong to, before slicing
    with output.staged_dir(out, overwrite=overwrite) as tmp:
        if loaded.offloaded:
            write_streamed(loaded, kept_ids, channels, tmp, report, timings, progress)
        else:
            with timings.phase("slicing"):
                slicing.slice_model(model, kept_ids, channels or None)
            report["parameters"]["after"] = models.parameter_counts(model)
            with timings.phase("save"):
                model.save_pretrained(tmp, safe_serialization=True)
        with timings.phase("save"):
            save_tokenizer(loaded, report["kept_token_ids"], tmp, report)
            if scores is not None:
                output.save_scores(scores, tmp / "compact_scores.safetensors", shape)
        output.write_json(tmp / "compact_report.json", report)


def write_streamed(loaded: Loaded, kept_ids, kept_channels, folder: Path, report: dict, timings: Timings,
                   progress) -> None:
    """Slice the checkpoint tensor by tensor from the source files into `folder` (never the whole model)."""
    from .streamed import write_pruned

    with timings.phase("slicing"):
        summary = write_pruned(loaded.source, folder, kept_ids, kept_channels, device=loaded.device,
                               progress=progress)
    report["parameters"]["after"] = summary["parameters"]["after"]


def save_tokenizer(loaded: Loaded, kept_ids: list[int], folder: Path, report: dict) -> None:
    """The tokenizer cut to `kept_ids` into `folder`; a warning when the model has none."""
    if loaded.tokenizer is None:
        warnings.warn("the model has no tokenizer: the pruned checkpoint is written without one", stacklevel=2)
        report["tokenizer"] = None
    else:
        tokenizer.prune_tokenizer(loaded.tokenizer, kept_ids).save_pretrained(folder)
        report["tokenizer"] = "pruned to kept_token_ids"
