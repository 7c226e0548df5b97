"""The `compact` command line: score, prune, eval, demo, check.

Every error exits 2 with one line and no traceback (unless --debug); a failed --check exits 1; SIGINT 130
and SIGTERM 143, with staged output removed.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import __version__, options
from .options import CHOICES, CRITERIA, DTYPES, CalibOptions, Load, Method, Output, Run
from .zeroshot import DATA_INSTALL, LM_EVAL_INSTALL, PAPER, TASKS


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _held_to(rule, parse=int):
    """argparse's type= for a flag: the text as `parse` reads it (kept as text when it cannot be), held to `rule`,
    one of compact.options' rules (the one its option group checks when built), as a one-line usage error."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = text  # the rule's message says what it must be
        problem = rule(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return convert


_count, _count_or_0 = _held_to(options.count), _held_to(lambda value: options.count(value, low=0))
_fraction, _seed = _held_to(options.fraction, parse=float), _held_to(options.seed)
_vocab_keep = _held_to(lambda value: options.keep(value, "--vocab-keep"), parse=str)
_ffn_keep = _held_to(lambda value: options.keep(value, "--ffn-keep"), parse=str)
_weight, _positive = _held_to(options.weight, parse=float), _held_to(options.positive, parse=float)


def _vocab_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab-order", choices=CHOICES["--vocab-order"], default="auto",
                   help="id: keep the lowest ids (the paper); frequency: the most frequent tokens in --calib, "
                        "completed with their merge ancestors; auto (default): frequency when --calib is given")
    p.add_argument("--vocab-prior", type=_weight, default=0.0, metavar="LAMBDA",
                   help="frequency order: rank tokens by counts + LAMBDA * N * prior, the tokenizer's own prior "
                        "(Zipf over merge rank) weighed as LAMBDA times the N tokens counted, so that a short or "
                        "narrow --calib does not drop what other text needs (default 0.0: the counts alone)")
    p.add_argument("--vocab-always", metavar="FILE",
                   help="token strings (one per line, as the vocabulary spells them) kept in either order, with "
                        "the merge ancestors they need")


def _criterion_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ffn-criterion", choices=CHOICES["--ffn-criterion"], default="common-act2",
                   help="; ".join(f"{k}: {v}" for k, v in CRITERIA.items()))
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the random criterion and of --calib-generate's text (default 0)")


def _check_and_run_options(p: argparse.ArgumentParser) -> None:
    """--check, --overwrite and the checkpoint/resume options of `score` and `prune`."""
    p.add_argument("--check", action="store_true", help="recompute the first batches with forward hooks and compare")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _run_options(p)


def _size(text: str) -> int:
    """Bytes from "512M", "8G", "1.5T" or a plain count."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number, unit = text[:-1] if text[-1:].isalpha() else text, text[-1:].upper() if text[-1:].isalpha() else ""
    try:
        value = float(number) * units[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a size such as 512M, 8G or 0, got {text}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be a size of 0 or more, got {text}")
    return int(value)


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-every", type=_count, metavar="N",
                   help="save the calibration pass's state every N layers into OUT.ckpt/ (resumable with --resume)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.ckpt/")
    p.add_argument("--host-memory", type=_size, metavar="SIZE",
                   help="host memory the calibration's hidden states may take, e.g. 8G (default: half the memory "
                        "available; beyond it they go to a file beside OUT)")


def _model_options(p: argparse.ArgumentParser, optional: bool = False, offload: bool | None = None) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?" if optional else None,
                   help="a local model directory, a .gguf file (dequantized on loading), a llama2.c .bin checkpoint, "
                        "or a hub id in the local cache")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--dtype", default="auto", choices=CHOICES["--dtype"], help=options.DTYPE_HELP)
    p.add_argument("--batch-size", type=_count, default=1, help="sequences per forward (default 1)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer for a model without one (e.g. a llama2.c checkpoint): a tokenizer folder, "
                        "tokenizer.json or SentencePiece tokenizer.model; used for text data and written with a prune")
    if (not optional) if offload is None else offload:
        p.add_argument("--offload", choices=CHOICES["--offload"], default="none",
                       help="layerwise: never hold the whole model: score one decoder layer at a time from the "
                            "safetensors files, and (prune) write the pruned checkpoint tensor by tensor")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary tables")


def _calib_options(p: argparse.ArgumentParser, flag: str = "--calib", required: bool = False) -> None:
    p.add_argument(flag, dest="calib", required=required, metavar="PATH", nargs="+",
                   help=".txt, .jsonl (text field), .npy token ids (1-D or [N, L]) or .bin token memmap; a folder of "
                        "them, or several: the rows are shared out evenly and every source's token counts weigh the "
                        "same")
    p.add_argument("--samples", type=_count, default=16, help="sequences (default 16)")
    p.add_argument("--seq-len", type=_count, default=2048, help="tokens per sequence (default 2048, capped at the context)")
    p.add_argument("--calib-dtype", choices=CHOICES["--calib-dtype"], help="token dtype of a .bin memmap")
    if flag == "--calib":
        p.add_argument("--calib-generate", type=_count_or_0, default=0, metavar="N",
                       help="N texts the model writes itself (as compact generate samples them, each up to --seq-len "
                            "and at most 512 tokens, seeded by --seed), mixed in as one more calibration source: "
                            "calibration that keeps what other kinds of text need (32 fill half the default 16 x 2048 "
                            "rows; default 0)")


def _score_command(sub) -> None:
    """The `compact score` subcommand and its options."""
    s = sub.add_parser("score", help="common act^2 per FFN channel -> a scores file")
    _model_options(s)
    _calib_options(s, required=True)
    s.add_argument("--vocab-keep", type=_vocab_keep, metavar="N",
                   help="weight only tokens of the kept vocabulary (N regular tokens plus the specials; N as prune "
                        "takes it)")
    _vocab_options(s)
    _criterion_options(s)
    s.add_argument("--out", required=True, type=Path, help="scores file (.safetensors)")
    _check_and_run_options(s)
    s.set_defaults(func=_cmd_score)


def _trials_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan-trials", type=_count_or_0, default=0, metavar="N",
                   help="--target-params: prune the N best-priced splits in memory and keep the one that reads the "
                        "calibration rows after --samples best (bits/byte); 0 keeps the best-priced (default 0: on "
                        "SmolLM2-135M, 3 trials on 4 held-out rows picked a split 0.025 bits/byte worse)")


class _OneRefit(argparse.Action):
    """--refit and --ffn-repair (its old name for same-input) set one value: two flags that disagree are refused,
    not settled by their order."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        earlier = getattr(namespace, "_refit_flag", None)
        if earlier is not None and getattr(namespace, self.dest) != value:
            parser.error(f"{earlier} and {option_string} ask for different re-fits: give one")
        namespace._refit_flag = option_string if self.nargs == 0 else f"{option_string} {value}"
        setattr(namespace, self.dest, value)


def _refit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refit", choices=CHOICES["--refit"], default="auto", action=_OneRefit,
                   help="re-fit each down_proj's kept columns by least squares (closed form, no training): "
                        "sequential (the default with --calib and an FFN cut) fits the pruned model's activations "
                        "to the unpruned layer's output, layer after layer; same-input fits the unpruned model's "
                        "activations (cheaper); mlp starts from sequential's solution and takes a few Adam steps on "
                        "the kept gate/up rows and down columns together, stopped on held-out calibration rows; "
                        "none keeps the columns as they are")
    p.add_argument("--ffn-repair", dest="refit", action=_OneRefit, nargs=0, const="same-input",
                   help="the same as --refit same-input (kept for earlier scripts)")


def _prune_command(sub) -> None:
    """The `compact prune` subcommand and its options."""
    r = sub.add_parser("prune", help="prune vocabulary and/or FFN channels -> a standard checkpoint")
    _model_options(r)
    r.add_argument("--out", required=True, type=Path, help="output directory (refused if not empty, unless --overwrite)")
    r.add_argument("--vocab-keep", type=_vocab_keep, metavar="N",
                   help="regular tokens to keep (the lowest ids or the most frequent: --vocab-order) plus specials: "
                        "a count (24576, or 1tok for one) or a ratio of the regular tokens in (0, 1] (0.5; 1.0 keeps "
                        "all); byte tokens, ASCII characters and the word-boundary piece always stay")
    r.add_argument("--ffn-keep", type=_ffn_keep, metavar="K",
                   help="FFN channels to keep per layer: a count (128, or 1ch for one) or a ratio in (0, 1] (0.5; 1.0 "
                        "keeps all)")
    r.add_argument("--ffn-multiple", type=_count, default=64, help="round a --ffn-keep ratio to this (default 64)")
    r.add_argument("--target-params", type=_fraction, metavar="F",
                   help="keep this fraction of the parameters; the split between vocabulary and FFN is planned")
    _vocab_options(r)
    _criterion_options(r)
    _refit_options(r)
    _trials_option(r)
    r.add_argument("--ffn-select", choices=CHOICES["--ffn-select"], default="scores",
                   help="which channels stay: the top of --ffn-criterion (default), or obs: greedy elimination "
                        "for the re-fit (Optimal Brain Surgeon on its least-squares objective)")
    r.add_argument("--scores", help="use this scores file instead of calibrating")
    _gguf_option(r, default=None)
    _calib_options(r)
    _check_and_run_options(r)
    r.set_defaults(func=_cmd_prune)


def _gguf_option(p: argparse.ArgumentParser, default: str | None) -> None:
    """--gguf [TYPE] (`default` when absent; f16 when given without a type) and --gguf-pre."""
    p.add_argument("--gguf", nargs="?", const="f16", default=default, choices=CHOICES["--gguf"],
                   metavar="TYPE",
                   help="also write the checkpoint as GGUF for llama.cpp (OUT/model-TYPE.gguf): f32, f16 (the "
                        f"default TYPE), bf16 or q8_0; needs {options.GGUF_INSTALL}")
    p.add_argument("--gguf-pre", metavar="NAME",
                   help="llama.cpp's name for the tokenizer's pre-tokenizer (tokenizer.ggml.pre: smollm, llama-bpe, "
                        "qwen2, ...), where neither a GGUF source nor the tokenizer gives it")


def _export_command(sub) -> None:
    """The `compact export` subcommand and its options."""
    x = sub.add_parser("export", help="write a pruned checkpoint folder as GGUF for llama.cpp")
    x.add_argument("model", metavar="DIR", help="a checkpoint folder with its tokenizer (as compact prune writes it)")
    _gguf_option(x, default="f16")
    x.add_argument("--out", type=Path, help="the .gguf file (default DIR/model-TYPE.gguf)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing .gguf file")
    x.add_argument("--quiet", action="store_true", help="print nothing on success")
    x.set_defaults(func=_cmd_export)


def _plan_command(sub) -> None:
    """The `compact plan` subcommand and its options."""
    n = sub.add_parser("plan", help="print the vocabulary/FFN splits weighed for --target-params, and the choice")
    _model_options(n)
    _calib_options(n, required=True)
    n.add_argument("--target-params", type=_fraction, required=True, metavar="F", help="fraction of parameters to keep")
    n.add_argument("--ffn-multiple", type=_count, default=64,
                   help="FFN channel counts are multiples of this (default 64)")
    _refit_options(n)
    _trials_option(n)
    _vocab_options(n)
    n.set_defaults(func=_cmd_plan)


def _eval_command(sub) -> None:
    """The `compact eval` subcommand and its options."""
    e = sub.add_parser("eval", help="held-out NLL / perplexity, parameter counts, memory, optional tokens/s; "
                                    "zero-shot accuracy (lm-eval)",
                       description="Give --data, --tasks or both. Exit status 1 when some --compare models could not "
                                   "be evaluated (the table says why), 2 when none could.")
    _model_options(e, optional=True)
    _calib_options(e, flag="--data")
    e.add_argument("--tasks", metavar="LIST",
                   help="zero-shot accuracy by lm-eval on local validation splits: comma-separated tasks "
                        f"({', '.join(TASKS)}), paper ({','.join(PAPER)}) or all; needs "
                        f"{LM_EVAL_INSTALL} and {DATA_INSTALL}. Results are added to MODEL/zeroshot.json (a folder)")
    e.add_argument("--limit", type=_count, metavar="N",
                   help="--tasks: the first N questions of each task (default all)")
    e.add_argument("--compare", nargs="+", metavar="MODEL", default=[],
                   help="more models to evaluate on the same text and tasks, in one table (bits/byte compares "
                        "tokenizers fairly); with --tasks the first of them is the reference (the original): each "
                        "other model's accuracy is also given as a fraction of its")
    e.add_argument("--speed", action="store_true",
                   help="also measure prefill and decode tokens/s (one warm-up, then the median of 5 runs)")
    e.set_defaults(func=_cmd_eval)


def _generate_command(sub) -> None:
    """The `compact generate` subcommand and its options."""
    g = sub.add_parser("generate", help="calibration text the model writes itself -> a .txt file for --calib",
                       description="Samples drawn from the model's own distribution, from its BOS token; the file "
                                   "holds them as documents separated by form feeds. Mix it with a corpus: "
                                   "--calib corpus.txt generated.txt.")
    _model_options(g, offload=False)
    g.add_argument("--out", required=True, type=Path, help="the text file to write (never replaced)")
    g.add_argument("--samples", type=_count, default=16, help="texts to write (default 16)")
    g.add_argument("--seq-len", type=_count, default=512, help="new tokens per text at most (default 512)")
    g.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    g.add_argument("--temperature", type=_positive, default=1.0,
                   help="sampling temperature (default 1.0: the model's own distribution)")
    g.set_defaults(func=_cmd_generate)


def _demo_command(sub) -> None:
    """The `compact demo` subcommand and its options."""
    d = sub.add_parser("demo", help="the whole job on an embedded default model and text (20-35 s on a 2-core CPU)")
    d.add_argument("--out", type=Path, default=Path("demo_out"), help="where the pruned demo model goes (default demo_out)")
    d.add_argument("--quiet", action="store_true", help="print only the results table")
    d.set_defaults(func=_cmd_demo)


def _check_command(sub) -> None:
    """The `compact check` subcommand and its options."""
    c = sub.add_parser("check", help="run every kernel against its plain-torch reference and print a table")
    c.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of the test tensors (default bfloat16)")
    c.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when present)")
    c.add_argument("--compile", action="store_true",
                   help="instead: compile every kernel variant ahead of time for sm_80 and sm_90 (no GPU needed) and "
                        "print registers, spills, 16-byte loads and 64-bit divisions")
    c.set_defaults(func=_cmd_check)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compact", description="COMPACT pruning of LLM vocabularies and FFN channels.")
    p.add_argument("--version", action="version", version=f"compact {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in (_score_command, _prune_command, _plan_command, _eval_command, _export_command, _generate_command,
                _demo_command, _check_command):
        add(sub)
    return p


# Every flag of score, prune and plan -> (option group, field[, how the value converts]): the one place flags
# become options (compact.options). Renaming a flag without this table fails
# tests/test_cli.py::test_every_flag_reaches_an_option.
FLAGS = {
    "model": ("load", "source"), "device": ("load", "device"), "dtype": ("load", "dtype"),
    "trust_remote_code": ("load", "trust_remote_code"), "tokenizer": ("load", "tokenizer"),
    "offload": ("load", "offload"),
    "calib": ("calib", "path", lambda paths: paths if not paths or len(paths) > 1 else paths[0]),  # (as CalibOptions)
    "samples": ("calib", "samples"), "seq_len": ("calib", "seq_len"),
    "calib_dtype": ("calib", "bin_dtype"), "calib_generate": ("calib", "generate"),
    "vocab_keep": ("method", "vocab_keep"), "ffn_keep": ("method", "ffn_keep"),
    "target_params": ("method", "target_params"), "vocab_order": ("method", "vocab_order"),
    "vocab_prior": ("method", "vocab_prior"), "vocab_always": ("method", "vocab_always"),
    "ffn_multiple": ("method", "ffn_multiple"),
    "ffn_criterion": ("method", "ffn_criterion"), "seed": ("method", "seed"), "scores": ("method", "scores"),
    "refit": ("method", "refit"), "ffn_select": ("method", "ffn_select"), "plan_trials": ("method", "plan_trials"),
    "batch_size": ("run", "batch_size"), "quiet": ("run", "progress", lambda quiet: False if quiet else None),
    "check": ("run", "check"), "checkpoint_every": ("run", "checkpoint_every", lambda every: every or 0),
    "resume": ("run", "resume"), "host_memory": ("run", "host_memory"),
    "out": ("output", "out"), "overwrite": ("output", "overwrite"), "gguf": ("output", "gguf"),
    "gguf_pre": ("output", "gguf_pre"),
}


def _groups(args) -> dict:
    """The option groups of `args` by FLAGS (fields whose flag this command lacks keep their defaults); the run's
    checkpoint folder is OUT.ckpt for `score` and `prune` (where streams too large for memory go too)."""
    from dataclasses import replace

    given: dict[str, dict] = {"load": {}, "calib": {}, "method": {}, "run": {}, "output": {}}
    for dest, (group, name, *convert) in FLAGS.items():
        if hasattr(args, dest):
            value = getattr(args, dest)
            given[group][name] = convert[0](value) if convert else value
    groups = {"load": Load(**given["load"]), "calib": CalibOptions(**given["calib"]),
              "method": Method(**given["method"]), "run": Run(**given["run"]), "output": Output(**given["output"])}
    folder = Path(f"{groups['output'].out}.ckpt")
    if args.command in ("score", "prune") and (folder.is_dir() or not folder.exists()):
        groups["run"] = replace(groups["run"], checkpoint=str(folder))
    return groups


def _load(load, vocab_keep: float | str | None = None):
    """MODEL as the load options say, with --tokenizer in place of its own when given; an out-of-range
    --vocab-keep is refused from the tokenizer, before the weights are read."""
    from .loading import load as load_model
    from .loading import load_skeleton
    from .vocab import Vocabulary

    def vet(tokenizer, rows: int) -> None:
        Vocabulary(tokenizer, rows).check_keep(vocab_keep)

    loader = load_skeleton if load.offload == "layerwise" else load_model
    return loader(load.source, dtype=load.dtype, device=load.device, trust_remote_code=load.trust_remote_code,
                  tokenizer=load.tokenizer, vet=None if vocab_keep is None else vet)


def _cmd_score(args) -> int:
    from . import loading, models, output, pruning, runs

    g = _groups(args)
    _check_early(args, g)
    out, method, run = g["output"].out, g["method"], g["run"]
    output.check_destination(out, overwrite=g["output"].overwrite, protected=loading.locate(args.model), kind="file")
    loaded = _load(g["load"], method.vocab_keep)
    group = runs.group()
    try:
        decision = pruning.decide(loaded, method, g["calib"], run, upto="scoring", group=group)
    finally:
        runs.leave()
    if group.rank != 0:
        return 0  # rank 0 writes
    source = decision.calibration.source if decision.calibration else None
    meta = {"model": loaded.source, "calibration": str(source), "vocab_keep": str(decision.vocab_keep),
            "vocab_order": decision.method.vocab_order, "ffn_criterion": method.ffn_criterion,
            "compact": __version__, **models.fingerprint(loaded.model.config)}
    output.save_scores(decision.scores, out, meta, overwrite=g["output"].overwrite)
    _DONE.complete = True
    runs.discard(run.checkpoint)
    if not args.quiet:
        scores = decision.scores
        print(f"scores for {len(scores)} layers x {next(iter(scores.values())).numel()} channels -> {out}")
        print(f"calibration: {source}")
        if decision.check:
            print(f"check vs hooks: max relative difference {decision.check.max_rel_diff:.3g} "
                  f"(rtol {decision.check.rtol:g})")
    return 0


def _cmd_plan(args) -> int:
    from . import pruning, tables

    g = _groups(args)
    options.check_method(g["method"], g["calib"], prune=False)
    loaded = _load(g["load"])
    decision = pruning.decide(loaded, g["method"], g["calib"], g["run"], upto="planning")
    print(tables.plan_summary(loaded.source, decision.calibration.source, decision.plan))
    return 0


def _check_early(args, groups: dict) -> None:
    """What can be refused before loading the model: the method's rules with the calibration, a calibration file
    that is not there, a checkpoint in the way."""
    options.check_method(groups["method"], groups["calib"], prune=args.command == "prune")
    groups["calib"].files()  # a missing file, or a folder without calibration files
    _check_checkpoint(args)


def _check_checkpoint(args) -> None:
    """An interrupted run's checkpoints at OUT.ckpt are continued with --resume, never silently dropped; a file of
    that name is not compact's, and is never touched."""
    checkpoint = Path(f"{args.out}.ckpt")
    if checkpoint.exists() and not checkpoint.is_dir() and (args.resume or args.checkpoint_every):
        raise ValueError(f"{checkpoint} is damaged or not a checkpoint compact wrote (a file: compact's checkpoints "
                         f"are a folder): move or delete it")
    from . import runs

    if not args.resume and runs.holds_checkpoints(checkpoint):
        raise ValueError(f"{checkpoint} holds an interrupted run: pass --resume to continue it, or delete it")
    if args.resume and not runs.holds_checkpoints(checkpoint):
        warnings.warn(f"--resume: {checkpoint} holds no checkpoint; the run starts from the beginning", stacklevel=2)


def _cmd_prune(args) -> int:
    from . import export, loading, output, pruning, report, runs

    g = _groups(args)
    _check_early(args, g)
    out = g["output"]
    output.check_destination(out.out, overwrite=out.overwrite, protected=loading.locate(args.model))
    if out.gguf:
        export.check_exportable(args.model, out.gguf_pre)
    loaded = _load(g["load"], g["method"].vocab_keep)
    group = runs.group()
    try:
        decision = pruning.decide(loaded, g["method"], g["calib"], g["run"], group=group)
    finally:
        runs.leave()
    if group.rank != 0:
        return 0  # rank 0 writes
    result = pruning.write(loaded, decision, out.out, out.overwrite, g["run"].progress)
    _DONE.complete = not out.gguf
    if out.gguf:
        _DONE.note = (f"{out.out} holds the complete pruned checkpoint, without its GGUF: write it with "
                      f"`compact export {out.out} --gguf {out.gguf}`")
    runs.discard(g["run"].checkpoint)
    if not args.quiet:
        print(report.prune_summary(result, out.out))
    if out.gguf:
        _write_gguf(out.out, outtype=out.gguf, pre=out.gguf_pre, out=None, quiet=args.quiet)
    return 0


def _cmd_export(args) -> int:
    from . import export

    export.check_folder(args.model)
    out = args.out or export.gguf_path(args.model, args.gguf)
    export.check_out(out, overwrite=args.overwrite)
    _write_gguf(args.model, outtype=args.gguf, pre=args.gguf_pre, out=out, quiet=args.quiet)
    return 0


def _write_gguf(folder, *, outtype: str, pre: str | None, out, quiet: bool) -> None:
    """`folder` as GGUF of --gguf TYPE (`outtype`) into `out` (None: beside it), --gguf-pre NAME `pre`; the folder's
    model card lists it."""
    from . import export, report

    with report.card_follows(folder):
        path = export.export(folder, outtype, out, pre)
    if not quiet:
        print(f"GGUF ({outtype}) -> {path} ({path.stat().st_size / 2**20:.1f} MiB); run it with llama.cpp: "
              f"llama-cli -m {path}")


def _cmd_eval(args) -> int:
    """Every model on the same data and tasks, one table each; a model that cannot be evaluated (say, data with
    ids a pruned vocabulary dropped) gets its reason in the table and the exit status is 1; 2 when none could be."""
    import gc
    from dataclasses import replace

    from . import loading, tables, zeroshot

    g = _groups(args)
    sources = list(dict.fromkeys(([args.model] if args.model else []) + args.compare))  # each model once
    if not sources:
        raise ValueError("give MODEL and/or --compare MODEL ...")
    if not args.calib and not args.tasks:
        raise ValueError("give --data (held-out text: bits/byte) and/or --tasks (zero-shot accuracy)")
    names = zeroshot.task_names(args.tasks) if args.tasks else ()
    if names:
        zeroshot.check_installed(names)
    elif args.limit:
        raise ValueError("--limit counts questions of --tasks: give --tasks too")
    for source in sources:
        loading.locate(source)  # a missing model fails before any work
    results, data_source = {}, None
    for source in sources:
        try:
            loaded = _load(replace(g["load"], source=source))
            results[source] = _eval_one(loaded, args, g, names)
            data_source = data_source or results[source].get("data_source")
        except Exception as e:  # noqa: BLE001 - one model's failure is a cell of the table, not the end
            if args.debug or len(sources) == 1:
                raise
            results[source] = {"error": _one_line(e)}
        loaded = None
        gc.collect()
    failed = [s for s, r in results.items() if "error" in r]
    if len(failed) == len(sources):
        raise ValueError("no model could be evaluated: " + "; ".join(f"{s}: {results[s]['error']}" for s in failed))
    if args.calib:
        print(tables.eval_table({s: {k: v for k, v in r.items() if k != "tasks"} for s, r in results.items()},
                                data_source))
    if names:
        reference = args.compare[0] if args.compare and args.compare[0] != args.model else None
        runs = {s: r.get("tasks", r.get("error")) for s, r in results.items()}
        print(("\n" if args.calib else "") + tables.tasks_table(runs, reference=reference, limit=args.limit))
        saved = zeroshot.save(sources[0], runs, reference=reference, limit=args.limit)
        if not args.quiet:
            print(f"added to {saved}" if saved else f"(not saved: {sources[0]} is not a checkpoint folder)")
    return 1 if failed else 0


def _eval_one(loaded, args, g: dict, names: tuple[str, ...]) -> dict:
    """One model's results: bits/byte on --data (compact.evaluate's keys and the data's source), and its
    TaskScores on --tasks."""
    from . import evaluate, pruning, zeroshot

    result = {}
    if args.calib:
        data = pruning.calibrate(loaded, g["calib"], g["run"].progress)
        result = evaluate.evaluate(loaded.model, data, tokenizer=loaded.tokenizer, batch_size=args.batch_size,
                                   measure_speed=args.speed, progress=g["run"].progress)
        result["data_source"] = data.source
    if names:
        result["tasks"] = zeroshot.evaluate(loaded.model, loaded.tokenizer, names, limit=args.limit,
                                            batch_size=args.batch_size, progress=g["run"].progress)
    return result


def _cmd_generate(args) -> int:
    from . import generate

    g = _groups(args)
    generate.check_out(args.out)  # before the model loads
    loaded = _load(g["load"])
    sampling = generate.Sampling(samples=args.samples, length=args.seq_len, seed=args.seed,
                                 temperature=args.temperature, batch_size=args.batch_size)
    generate.write(generate.generate(loaded, sampling, progress=g["run"].progress), args.out)
    if not args.quiet:
        print(f"{args.samples} texts of up to {args.seq_len} tokens -> {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, quiet=args.quiet)


def _cmd_check(args) -> int:
    if args.compile:
        import os
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real kernels, not the interpreter
        return subprocess.run([sys.executable, "-m", "compact_kernels.compile_check"], env=env).returncode
    from compact_kernels.check import CHECK_HEAD, check_table_rows, run_kernel_check

    from .loading import DTYPE_NAMES, resolve_device
    from .tables import format_table

    rows = run_kernel_check(DTYPE_NAMES[args.dtype], resolve_device(args.device))
    print(format_table(CHECK_HEAD, check_table_rows(rows)))
    return 0 if all(r.ok for r in rows) else 1


def _setup_output(quiet: bool) -> None:
    """Library chatter off; warnings as one line each; progress bars only in a terminal, none with --quiet."""
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.formatwarning = lambda message, category, *rest: f"compact: warning: {message}\n"
    if quiet or not sys.stderr.isatty():  # transformers' own bars ("Loading weights") only in a terminal
        import huggingface_hub

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    if quiet:
        warnings.filterwarnings("ignore")


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the container's CPU quota allows (cgroup v2 cpu.max or v1 cfs quota), None when unlimited or unknown.

    OpenMP sizes its thread pool from the CPUs it may be scheduled on, not from the quota: in a 2-CPU container
    on a 64-core host torch would start dozens of threads that spin against each other."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _setup_threads() -> None:
    """At most one torch thread per CPU the quota allows, unless the user chose (OMP_NUM_THREADS)."""
    import math
    import os

    cpus = _cgroup_cpus()
    if cpus is None or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    if torch.get_num_threads() > math.ceil(cpus):
        torch.set_num_threads(max(1, math.ceil(cpus)))


class Terminated(BaseException):
    """SIGTERM (timeout, Slurm, docker stop) turned into an exception, so staged output is cleaned up."""


def _on_sigterm(signum, frame):
    raise Terminated


def _one_line(error: BaseException) -> str:
    """The error as one line: library messages (transformers') span several."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (ValueError, OSError, IndexError)) else f"{type(error).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 1 when --check (or an eval --compare model) fails, 2 with one line on stderr for any
    error (--debug shows the traceback), 130 on SIGINT and 143 on SIGTERM; partial output is removed."""
    import signal

    args = _parser().parse_args(argv)  # imports no torch: --help and --version are instant
    _DONE.note, _DONE.complete = None, False
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:  # from here every import (torch: seconds) runs under the handlers below, an early SIGINT included
        with _interrupts_repeated() as handled:
            try:
                _setup_threads()
                _setup_output(getattr(args, "quiet", False))
                status = args.func(args)
                _DONE.complete = True  # (a SIGINT from here on changes nothing: it is ignored)
                return status
            except KeyboardInterrupt:
                handled()
                print(f"compact {args.command}: interrupted; {_DONE.note or 'no output was written' + _kept(args)}",
                      file=sys.stderr)
                return 130
    except Terminated:
        print(f"compact {args.command}: terminated (SIGTERM); no output was written{_kept(args)}", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - every failure is one line; --debug shows where
        if _check_failed(e):
            print(f"compact {args.command}: {e}", file=sys.stderr)
            return 1
        if args.debug:
            raise
        print(f"compact {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Done:
    """What the running command has finished: `complete` (its output is whole: an interrupt changes nothing),
    and `note`, what an interrupt leaves behind when that is not nothing."""

    complete: bool = False
    note: str | None = None


_DONE = _Done()


def _kept(args) -> str:
    """What an interrupted run leaves: its checkpoints, when it saved any."""
    folder = Path(f"{getattr(args, 'out', None)}.ckpt")  # (read without compact.runs: its torch import is slow)
    saved = folder.is_dir() and any(".layer" in p.name and p.suffix != ".tmp" for p in folder.iterdir())
    if getattr(args, "out", None) and saved:
        return f"; {folder} holds its checkpoints: rerun with --resume to continue"
    return ""


@contextmanager
def _interrupts_repeated():
    """Inside the block, a SIGINT is raised again every 0.2 s until the caller says it is `handled()`: Python
    drops an exception raised in a __del__ method or a weakref callback (an import's module-lock callback, a
    regex object's __del__), so a Ctrl-C landing there would be lost and the run would go on (seen about once in
    60 runs interrupted while importing); the dropped one's "Exception ignored" report is kept off stderr."""
    import _thread
    import signal
    import threading

    if not _main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: None  # SIGINT ignored (a background job) or handled by the embedding program
        return
    done, started = threading.Event(), []

    def repeat():
        while not done.wait(0.2):
            _thread.interrupt_main()  # does nothing once SIGINT is ignored

    def on_sigint(signum, frame):
        if _DONE.complete:
            return
        if not started:
            started.append(threading.Thread(target=repeat, daemon=True))
            started[0].start()
        raise KeyboardInterrupt

    def handled():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        done.set()

    def unraisable(report, hook=sys.unraisablehook):
        if not issubclass(report.exc_type, KeyboardInterrupt):  # a dropped interrupt: it is raised again
            hook(report)

    signal.signal(signal.SIGINT, on_sigint)
    saved_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield handled
    finally:
        done.set()
        sys.unraisablehook = saved_hook
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run() -> None:
    """The `compact` program: main(), then exit with its status. A SIGTERM that arrives once main() has returned
    (the output is complete or cleanly refused; the interpreter is only shutting down) no longer turns that
    status into 143. After a SIGINT main() handled (130), the process ends here: CPython can keep that
    KeyboardInterrupt marked as unhandled (when it landed inside an import, as strace showed) and would then,
    at the end of its shutdown, kill itself with SIGINT instead of exiting 130."""
    import os
    import signal

    status = main()
    if _main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the output is complete or cleanly refused: exit as such
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)


def _check_failed(error: Exception) -> bool:
    """A failed --check (pruning.CheckFailed, looked up without importing the prune: it may be what failed)."""
    records = sys.modules.get(f"{__package__}.pruning.records")
    return isinstance(error, getattr(records, "CheckFailed", ()))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
