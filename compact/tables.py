"""Plain-text tables for the terminal: the parameters before and after, `compact eval`'s table, `compact plan`'s
splits."""
from __future__ import annotations

from pathlib import Path


def format_table(head: tuple, rows: list[tuple]) -> str:
    """Left-aligned columns separated by two spaces, a dashed rule under the header."""
    cells = [tuple(str(c) for c in r) for r in [head, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(cells[0]), line(tuple("-" * w for w in widths)), *map(line, cells[1:])])


def _millions(n: int) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n:,}"


def parameter_rows(before: dict, after: dict | None = None) -> list[tuple]:
    parts = ("embedding", "head", "attention", "ffn", "other", "total")
    if after is None:
        return [(p, _millions(before[p])) for p in parts]
    return [(p, _millions(before[p]), _millions(after[p]),
             f"{after[p] / before[p]:.1%}" if before[p] else "-") for p in parts]


EVAL_METRICS = (  # (label, key, format)
    ("tokens scored", "tokens", "{:,}"), ("bytes scored", "bytes", "{:,}"),
    ("bits / byte", "bits_per_byte", "{:.4f}"), ("bits / token", "bits_per_token", "{:.4f}"),
    ("NLL / token (nats)", "nll_per_token", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _rate(r: dict, name: str) -> str:
    """Median tokens/s with the slowest and fastest run."""
    key = f"{name}_tokens_per_s"
    if key not in r:
        return "-"
    low, high = r[f"{key}_range"]
    return f"{r[key]:,.0f} ({low:,.0f}-{high:,.0f})"


def short_labels(sources: list[str]) -> dict[str, str]:
    """Each model's column label: its folder or file name, or where two share it, the shortest trailing part of
    its path that no other model's path ends with."""
    parts = {source: Path(source).parts or (source,) for source in sources}
    labels = {}
    for source, own in parts.items():
        n = next((n for n in range(1, len(own)) if all(other[-n:] != own[-n:] for s, other in parts.items()
                                                       if s != source)), len(own))
        labels[source] = str(Path(*own[-n:]))
    return labels


def eval_table(results: dict[str, dict], data: str | None) -> str:
    """One column per model, headed by its short label (a legend line gives the paths it shortens): status,
    quality, memory, speed and parameters by part. A model that could not be evaluated has its reason in the
    status row and '-' elsewhere."""
    ok = {name: r for name, r in results.items() if "error" not in r}
    rows = [("status", *("ok" if "error" not in r else f"not evaluated: {r['error']}" for r in results.values()))]
    for label, key, fmt in EVAL_METRICS:
        if any(key in r for r in ok.values()):
            rows.append((label, *(fmt.format(r[key]) if key in r else "-" for r in results.values())))
    if ok:
        kind = next(iter(ok.values()))["work_memory_kind"]
        rows.append(("weights", *(_mib(r.get("weight_bytes")) for r in results.values())))
        rows.append((f"NLL pass memory above the model ({kind})",
                     *(_mib(r.get("work_memory_bytes")) for r in results.values())))
    if any("prefill_tokens_per_s" in r for r in ok.values()):
        repeats = next(r["speed_repeats"] for r in ok.values() if "speed_repeats" in r)
        rows.append((f"prefill tokens/s (median of {repeats}, range)", *(_rate(r, "prefill") for r in results.values())))
        rows.append((f"decode tokens/s (median of {repeats}, range)", *(_rate(r, "decode") for r in results.values())))
    for part in ("embedding", "head", "attention", "ffn", "other", "total"):
        rows.append((f"parameters: {part}",
                     *(_millions(r["parameters"][part]) if "parameters" in r else "-" for r in results.values())))
    labels = short_labels(list(results))
    return "\n".join([f"data: {data or '-'}", *_legend(labels), format_table(("metric", *labels.values()), rows)])


def _legend(labels: dict[str, str]) -> list[str]:
    """The line giving the paths that column labels shorten (none when no label is shortened)."""
    if all(label == source for source, label in labels.items()):
        return []
    return [f"models: {'; '.join(f'{label} = {source}' for source, label in labels.items())}"]


def plan_summary(model: str, data: str, plan) -> str:
    """`compact plan`'s output from the planner's record (a budget.Plan): the candidates priced, the measured
    trials, the choice."""
    rows = [("*" if c.chosen else "", f"{c.vocab_keep:,}", f"{c.vocab_rows:,}", f"{c.ffn_keep:,}",
             f"{c.fraction:.2%}", f"{c.token_loss:.4f}",
             "-" if c.cross_fitted_loss is None else f"{c.cross_fitted_loss:.4f}", f"{c.score_loss:.4f}",
             f"{c.cost:.4f}") for c in plan.candidates]
    chosen = plan.chosen
    return "\n".join([
        f"plan for {model}: keep {plan.target:.0%} of the parameters (calibration: {data})",
        f"rule: {plan.rule}", f"re-fit: {plan.refit}", "",
        format_table(("", "vocab keep", "rows kept", "FFN keep", "params kept", "token loss", "cross-fitted",
                      "score loss", "cost"), rows), "", *_measured(plan),
        f"choice: --vocab-keep {chosen.vocab_keep} --ffn-keep {chosen.ffn_keep} "
        f"({chosen.fraction:.2%} of the parameters)"])


def _measured(plan) -> list[str]:
    """The measured trials of the best-priced splits, as lines (none when the planner only priced)."""
    if plan.measured is None:
        return []
    rows = [("*" if m.chosen else "", f"{m.vocab_keep:,}", f"{m.ffn_keep:,}", f"{m.cost:.4f}",
             f"{m.bits_per_byte:.4f}") for m in plan.measured]
    return [f"measured: the best-priced splits pruned and read on {plan.held_out}", "",
            format_table(("", "vocab keep", "FFN keep", "cost", "held-out bits/byte"), rows), ""]


def tasks_table(runs: dict[str, tuple | str], *, reference: str | None, limit: int | None) -> str:
    """Zero-shot accuracy, one column per model (a model without scores has its reason in the status row): each
    task's acc, and acc_norm where it has one, with lm-eval's standard errors, then the average over the tasks
    of acc_norm where there is one, else acc; beside `reference`, each other model's figure is also given as a
    fraction of the reference's."""
    scored = {s: {t.task: t for t in r} for s, r in runs.items() if not isinstance(r, str)}
    tasks = next(iter(scored.values()))
    ref = scored.get(reference)

    def cell(source: str, task: str | None, metric: str) -> str:
        if source not in scored:
            return "-"
        mine = scored[source]
        value = sum(t.main for t in mine.values()) / len(mine) if task is None else getattr(mine[task], metric)
        text = f"{value:.3f}" if task is None else f"{value:.3f} ± {getattr(mine[task], metric + '_stderr'):.3f}"
        if ref is None or source == reference:
            return text
        base = sum(t.main for t in ref.values()) / len(ref) if task is None else getattr(ref[task], metric)
        return f"{text} ({value / base:.1%})" if base else text

    rows = [(name, metric, f"{t.samples:,}", *(cell(s, name, metric) for s in runs))
            for name, t in tasks.items() for metric in ("acc", "acc_norm") if getattr(t, metric) is not None]
    rows.append(("average", "acc_norm, else acc", "", *(cell(s, None, "") for s in runs)))
    if len(scored) < len(runs):
        rows.insert(0, ("status", "", "", *("ok" if s in scored else f"not evaluated: {runs[s]}" for s in runs)))
    labels = short_labels(list(runs))
    questions = "all questions" if limit is None else f"the first {limit:,} questions"
    title = (f"zero-shot accuracy (lm-eval, validation splits, {questions} of each task; ± its standard error"
             f"{f'; (%) of {labels[reference]}' if ref else ''})")
    return "\n".join([title, *_legend(labels), format_table(("task", "metric", "questions", *labels.values()), rows)])
