"""Human-readable summaries: plain-text tables for the terminal."""
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


def prune_summary(report: dict, out: Path) -> str:
    sizes, params = report["sizes"], report["parameters"]
    lines = [
        f"pruned {report['source']} -> {out}",
        f"vocabulary {sizes['vocab_before']:,} -> {sizes['vocab_after']:,} tokens; "
        f"FFN {sizes['intermediate_before']:,} -> {sizes['intermediate_after']:,} channels x {sizes['layers']} layers",
        "",
        format_table(("parameters", "before", "after", "kept"), parameter_rows(params["before"], params["after"])),
        "",
        "timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings_s"].items()),
    ]
    check = report["checks"].get("scores_vs_hooks")
    if check:
        lines.append(f"check vs hooks: max relative difference {check['max_rel_diff']:.3g} "
                     f"over {check['sequences']} sequences (rtol {check['rtol']:g}): ok")
    return "\n".join(lines)


def eval_summary(model: str, data: str, result: dict) -> str:
    rows = [("model", model), ("data", data), ("tokens scored", f"{result['tokens']:,}"),
            ("NLL / token (nats)", f"{result['nll_per_token']:.4f}"), ("perplexity", f"{result['perplexity']:.3f}")]
    if "prefill_tokens_per_s" in result:
        rows.append(("prefill tokens/s", f"{result['prefill_tokens_per_s']:,.0f}"))
    rows += [(f"parameters: {k}", v) for k, v in parameter_rows(result["parameters"])]
    return format_table(("metric", "value"), rows)
