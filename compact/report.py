"""compact_report.json: what a prune kept and why (`build_report`), and the text made from it: the summary a
prune prints and the model card (README.md) of a pruned folder."""
from __future__ import annotations

import fnmatch
import json
import platform
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .tables import EVAL_METRICS, format_table, parameter_rows


def build_report(loaded, decision, *, parameters_after: Mapping[str, int], tokenizer: str | None,
                 timings: Mapping[str, float]) -> dict:
    """compact_report.json of a decision applied to the model `loaded` held (the cut made): `parameters_after`
    the cut, `tokenizer` the tokenizer's fate (pruning.cut.save_tokenizer's words, None without one), `timings`
    seconds per phase."""
    method, sizes = decision.method, decision.sizes
    kept_ids = list(range(sizes.vocab_before) if decision.kept_token_ids is None else decision.kept_token_ids)
    channels = ([list(c) for c in decision.kept_channels.values()] if decision.kept_channels
                else [list(range(sizes.intermediate_before)) for _ in range(sizes.layers)])
    return {
        "source": loaded.source, "calibration": decision.calibration.source if decision.calibration else None,
        "scores_file": method.scores, "ffn_criterion": None if method.scores else method.ffn_criterion,
        "vocab_order": method.vocab_order, "plan": None if decision.plan is None else decision.plan.to_json(),
        "offload": "layerwise" if loaded.offloaded else "none",
        "dtype": {"compute": _dtype_name(decision.dtype), "output": _dtype_name(loaded.written_dtype),
                  **_storage(loaded.storage)},
        "options": {**asdict(method), **{f"calib_{k}": v for k, v in asdict(decision.calib).items()},
                    **_calib_used(decision.calibration)},
        "sizes": asdict(sizes),
        "parameters": {"before": dict(decision.parameters_before), "after": dict(parameters_after)},
        "checks": {"scores_vs_hooks": None if decision.check is None else asdict(decision.check)},
        "timings_s": {**({} if loaded.seconds is None else {"loading": loaded.seconds}), **timings},
        "versions": versions(), "kept_token_ids": kept_ids, "kept_channels": channels,
        "gguf_tokenizer": loaded.gguf_tokenizer or (loaded.report or {}).get("gguf_tokenizer"),
        **_composition(loaded, kept_ids), "tokenizer": tokenizer,
    }


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage(storage) -> dict:
    """The report's record of how the source stores its weights (nothing when unknown)."""
    return {} if storage is None else {"source": storage.name, "source_bits_per_weight": round(storage.bits, 3)}


def versions() -> dict:
    import torch
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"compact": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version, "python": platform.python_version()}


def original_ids(report: dict) -> tuple[list[int], int]:
    """(the original id of each token of a pruned model, the original vocabulary size) from its report: the
    composition of every prune since the original (`original_token_ids`), or the one prune's kept ids."""
    if "original_token_ids" in report:
        return report["original_token_ids"], report["vocab_original"]
    return report["kept_token_ids"], report["sizes"]["vocab_before"]


def _composition(loaded, kept_ids) -> dict:
    """For a model compact pruned before: each new token's id in the original model (before every prune) and
    the original vocabulary size, so that token-id data in original ids keeps its meaning."""
    if loaded.report_damaged:
        warnings.warn(f"{loaded.report_damaged}; the new report's ids are relative to this model only", stacklevel=4)
    if loaded.report is None:
        return {}
    previous, vocab = original_ids(loaded.report)
    return {"original_token_ids": [previous[i] for i in kept_ids], "vocab_original": vocab}


def _calib_used(calib) -> dict:
    """The calibration shape really used (--seq-len is capped at the context, --samples at the data)."""
    if calib is None:
        return {}
    samples, seq_len = calib.input_ids.shape
    return {"calib_samples": samples, "calib_seq_len": seq_len}


def prune_summary(report: dict, out: Path) -> str:
    """What `compact prune` prints: the cut, the parameters, the planner's choice in words, the timings (loading
    included) and a note when the output is written wider than the source stores it."""
    sizes, params = report["sizes"], report["parameters"]
    vocabulary = (f"vocabulary {sizes['vocab_before']:,} -> {sizes['vocab_after']:,} tokens (embedding rows, special "
                  "tokens included)")
    ffn = f"FFN {sizes['intermediate_before']:,} -> {sizes['intermediate_after']:,} channels x {sizes['layers']} layers"
    lines = [
        f"pruned {report['source']} -> {out}", f"{vocabulary}; {ffn}", "",
        format_table(("parameters", "before", "after", "kept"), parameter_rows(params["before"], params["after"])),
        "", *_plan_lines(report.get("plan")),
        "timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings_s"].items()),
        *_wider_lines(report.get("dtype") or {}),
    ]
    check = report["checks"].get("scores_vs_hooks")
    if check:
        lines.append(f"check vs hooks: max relative difference {check['max_rel_diff']:.3g} "
                     f"over {check['sequences']} sequences (rtol {check['rtol']:g}): ok")
    return "\n".join(lines)


def _plan_lines(plan: dict | None) -> list[str]:
    """The planner's choice in words: its sizes as the flags name them, and the two losses it weighed."""
    if not plan:
        return []
    chosen = next(c for c in plan["candidates"] if c["chosen"])
    crossed = chosen.get("cross_fitted_loss")
    refit = "" if plan.get("refit") in (None, "none") else f", scaled by what the {plan['refit']} re-fit leaves"
    sizes = (f"plan for {plan['target']:.0%} of the parameters: --vocab-keep {chosen['vocab_keep']:,} regular tokens "
             f"({chosen['vocab_rows']:,} rows with the special tokens), --ffn-keep {chosen['ffn_keep']:,} channels")
    dropped = (f"  calibration tokens the cut vocabulary drops (spelled with kept tokens instead): "
               f"{chosen['token_loss']:.2%}")
    crossed = "" if crossed is None else f" ({crossed:.2%} cross-fitted on halves of the text)"
    return [sizes, dropped + crossed,
            f"  FFN act^2 share of the cut channels, mean over layers{refit}: {chosen['score_loss']:.2%}"]


DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def _wider_lines(dtype: dict) -> list[str]:
    """A note when the output's weights take more bits than the source's (a 4-bit GGUF written as float32)."""
    bits, written = dtype.get("source_bits_per_weight"), DTYPE_BITS.get(dtype.get("output"))
    if bits is None or written is None or written <= bits:
        return []
    how = ("--dtype bfloat16 writes 16 bits (and computes in bfloat16)" if written > 16
           else "--gguf q8_0 also writes an 8-bit GGUF copy")
    return [(f"note: the weights are written as {dtype['output']}, {written / bits:.1f}x the {bits:.1f} bits per "
             f"weight the source stores ({dtype['source']}): {how}")]


PAPER = "[COMPACT](https://arxiv.org/abs/2509.06836) (Kwek & Yin)"


def write_card(folder: Path, report: dict) -> None:
    """README.md of a pruned `folder`: the model card of `report`, listing the files the folder holds."""
    files = {p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")} | {"README.md"}
    (Path(folder) / "README.md").write_text(model_card(report, files=tuple(sorted(files))), encoding="utf-8")


@contextmanager
def card_follows(folder):
    """README.md of a folder compact pruned lists the files written into it in the block (a GGUF), when it is still
    the card compact wrote: a card someone edited, or another README, is left alone."""
    folder = Path(folder)
    report = _card_report(folder)
    yield
    if report is not None:
        write_card(folder, report)


def _card_report(folder: Path) -> dict | None:
    """compact_report.json of `folder` when its README.md is the card compact writes for it now, else None."""
    try:
        report = json.loads((folder / "compact_report.json").read_text(encoding="utf-8"))
        card = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    files = {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    try:
        return report if card == model_card(report, files=tuple(sorted(files))) else None
    except (KeyError, TypeError, ValueError):  # a report of another version, or damaged: not compact's card now
        return None


def model_card(report: dict, *, files: tuple[str, ...] = ("compact_report.json",)) -> str:
    """README.md of a pruned folder from its compact_report.json: a Hugging Face model card (YAML front matter
    with base_model and tags), then the method and options, what was cut, the parameters before and after, the
    calibration data, any evaluation (`report["evaluation"]`: {"data": ..., "results": {model: metrics}}) and the
    `files` of the folder, each said."""
    sections = [
        _front_matter(report),
        f"# {_hub_id(report['source']) or Path(report['source']).name} pruned with COMPACT",
        f"`{report['source']}` pruned by {PAPER}, using compact {report.get('versions', {}).get('compact', '')}. "
        "The architecture is unchanged: it loads in plain `transformers`.",
        "## What was cut\n\n" + _cuts(report),
        "## Parameters\n\n" + _markdown_table(("part", "before", "after", "kept"), parameter_rows(
            report["parameters"]["before"], report["parameters"]["after"])),
        "## Method and options\n\n" + _method(report),
        "## Calibration data\n\n" + _calibration(report),
        "## Evaluation\n\n" + _evaluation(report),
        "## Files\n\n" + "\n".join(f"- `{name}`" + (f": {what}" if what else "")
                                   for name, what in ((n, _file_says(n, report)) for n in files)),
    ]
    return "\n\n".join(sections) + "\n"


def _file_says(name: str, report: dict) -> str | None:
    """What the file `name` of a pruned folder holds (None: a file this card does not know)."""
    cut = report["sizes"]["vocab_after"] < report["sizes"]["vocab_before"]
    says = (
        ("README.md", "this model card"),
        ("compact_report.json", ("everything above and the exact cut: `kept_token_ids` (new id i is old id "
                                 "`kept_token_ids[i]`) and `kept_channels` (the kept FFN channels of each layer, "
                                 "ascending)")),
        ("compact_scores.safetensors", ("the FFN channel scores of the calibration pass (`compact prune --scores` "
                                        "reads them)")),
        ("*.gguf", f"the checkpoint written as GGUF, for llama.cpp: `llama-cli -m {name}`"),
        ("model*.safetensors", f"the pruned weights ({(report.get('dtype') or {}).get('output', 'as saved')})"),
        ("model.safetensors.index.json", "which shard holds each tensor"),
        ("config.json", "the architecture, with the sizes after the cut"),
        ("generation_config.json", "generation defaults"),
        ("chat_template.jinja", "the chat template"),
        ("tokenizer*", "the tokenizer" + (", cut to the kept vocabulary" if cut else "")),
        ("special_tokens_map.json", "the tokenizer's special tokens"),
    )
    return next((what for pattern, what in says if fnmatch.fnmatch(name, pattern)), None)


def _front_matter(report: dict) -> str:
    """YAML (strings written as JSON, which YAML reads): base_model only when the source is a hub id."""
    sizes = report["sizes"]
    tags = ["compact", "pruned"]
    tags += ["vocabulary-pruning"] if sizes["vocab_after"] < sizes["vocab_before"] else []
    tags += ["ffn-pruning"] if sizes["intermediate_after"] < sizes["intermediate_before"] else []
    hub_id = _hub_id(report["source"])
    lines = ["---", *([f"base_model: {json.dumps(hub_id)}"] if hub_id else []), "tags:",
             *(f"- {t}" for t in tags), "library_name: transformers", "pipeline_tag: text-generation", "---"]
    return "\n".join(lines)


def _hub_id(source: str) -> str | None:
    """org/name of a model read from the Hugging Face cache (…/models--org--name/snapshots/…), else None."""
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", source)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _cuts(report: dict) -> str:
    """The vocabulary and FFN sizes before and after, one bullet each."""
    sizes, repaired = report["sizes"], report.get("options", {}).get("refit") not in (None, "none")
    vocab_before, vocab_after = sizes["vocab_before"], sizes["vocab_after"]
    ffn_before, ffn_after = sizes["intermediate_before"], sizes["intermediate_after"]
    vocab = (f"{vocab_before:,} -> {vocab_after:,} tokens ({vocab_before - vocab_after:,} dropped: rows of the "
             f"embedding and the LM head{', and the tokenizer cut to match' if report.get('tokenizer') else ''})"
             if vocab_after < vocab_before else f"not cut ({vocab_before:,} tokens)")
    ffn = (f"{ffn_before:,} -> {ffn_after:,} channels in each of the {sizes['layers']} layers"
           + (", down_proj re-fit by least squares on the calibration activations" if repaired else "")
           if ffn_after < ffn_before else f"not cut ({ffn_before:,} channels x {sizes['layers']} layers)")
    return f"- vocabulary: {vocab}\n- FFN: {ffn}"


def _method(report: dict) -> str:
    """How the cut was chosen: criterion, vocabulary order, the planner's split, the options that shape it."""
    sizes, lines = report["sizes"], []
    if sizes["intermediate_after"] < sizes["intermediate_before"]:
        lines.append(f"- FFN criterion: {report.get('ffn_criterion') or 'scores from ' + str(report['scores_file'])}")
    if sizes["vocab_after"] < sizes["vocab_before"]:
        lines.append(f"- vocabulary order: {report.get('vocab_order')}")
    plan = report.get("plan")
    if plan:
        chosen = next(c for c in plan["candidates"] if c["chosen"])
        lines.append(f"- split planned for {plan['target']:.0%} of the parameters: {chosen['vocab_keep']:,} regular "
                     f"tokens ({chosen['vocab_rows']:,} rows with the special tokens), {chosen['ffn_keep']:,} FFN "
                     f"channels ({plan['rule']})")
    given = {k: v for k, v in report.get("options", {}).items() if v is not None}
    lines.append("- options: " + ", ".join(f"`{k}={v}`" for k, v in given.items()))
    return "\n".join(lines)


def _calibration(report: dict) -> str:
    """The calibration text or ids and how much of them was used (or where the scores came from)."""
    if report.get("calibration"):
        return str(report["calibration"])
    if report.get("scores_file"):
        return f"none here: channel scores read from `{report['scores_file']}`"
    return "none (a data-free criterion, or no FFN cut)"


def _evaluation(report: dict) -> str:
    """The --check result and report["evaluation"] as a table, or how to run one."""
    lines = []
    check = (report.get("checks") or {}).get("scores_vs_hooks")
    if check:
        lines.append(f"Fused scores checked against the hook reference: max relative difference "
                     f"{check['max_rel_diff']:.3g} over {check['sequences']} sequences (rtol {check['rtol']:g}).")
    evaluation = report.get("evaluation")
    if evaluation:
        results = evaluation["results"]
        rows = [(label, *(fmt.format(r[key]) if key in r else "-" for r in results.values()))
                for label, key, fmt in EVAL_METRICS if any(key in r for r in results.values())]
        lines.append(f"On {evaluation.get('data', '-')}:\n\n" + _markdown_table(("metric", *results), rows))
    else:
        lines.append("No evaluation was run with the prune: `compact eval THIS_FOLDER --data FILE --compare SOURCE` "
                     "measures perplexity and bits per byte before and after.")
    return "\n\n".join(lines)


def _markdown_table(head: tuple, rows: list[tuple]) -> str:
    line = lambda r: "| " + " | ".join(str(c) for c in r) + " |"
    return "\n".join([line(head), line(("---",) * len(head)), *map(line, rows)])
