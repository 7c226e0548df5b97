"""compact.options: a torch-free leaf that owns every set of choices and each rule, read by the parser too."""
import argparse
import os
import subprocess
import sys

import pytest

from compact import cli
from compact.options import CHOICES, DTYPES, CalibOptions, Method, Run

NO_TORCH = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "numpy"):
            raise ImportError(f"{name} is blocked")

sys.meta_path.insert(0, Blocked())
from compact.options import CalibOptions, Load, Method, Output, Run

print(Method(), Run(), CalibOptions(), Output(), Load(), sep="\\n")
try:
    Method(refit="yes")
except ValueError as e:
    print(e)
print(sorted(m for m in sys.modules if m.startswith("compact")))
"""


def test_options_import_without_torch():
    """With torch, transformers and numpy unimportable, the groups build with their defaults and a bad choice is
    a one-line ValueError naming the flag; importing options imports no other compact module."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", NO_TORCH], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == repr(Method()) and lines[1] == repr(Run()), lines
    assert lines[5] == "--refit must be one of auto, none, same-input, sequential, mlp; got 'yes'", lines
    assert lines[6] == "['compact', 'compact.options']", lines


@pytest.mark.parametrize("group,given,message", [
    (Method, dict(ffn_select="top"), "--ffn-select must be one of scores, obs; got 'top'"),
    (Method, dict(ffn_criterion="act3"), "--ffn-criterion must be one of common-act2, act2, wanda, magnitude, random"),
    (Method, dict(ffn_multiple=0), "--ffn-multiple must be an integer of at least 1, got 0"),
    (Method, dict(vocab_keep=True), r"--vocab-keep must be a token count \(128, 1tok\) or a ratio in \(0, 1\]"),
    (Method, dict(target_params="0.5"), r"--target-params must be a fraction in \(0, 1\], got '0.5'"),
    (Run, dict(batch_size=0), "--batch-size must be an integer of at least 1, got 0"),
    (Run, dict(checkpoint_every=-1), "--checkpoint-every must be an integer of at least 0, got -1"),
    (CalibOptions, dict(seq_len=0), "--seq-len must be an integer of at least 1, got 0"),
])
def test_a_bad_value_is_one_line_naming_the_flag(group, given, message):
    with pytest.raises(ValueError, match=f"^{message}") as caught:
        group(**given)
    assert "\n" not in str(caught.value)


def _actions():
    subcommands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return [(command, action) for command, parser in subcommands.items() for action in parser._actions]


def test_the_parser_offers_the_choices_options_accepts():
    """Every choices= of the command line is a set that compact.options owns (check --dtype: no auto)."""
    offered = {(command, action.option_strings[0]): tuple(action.choices) for command, action in _actions()
               if action.choices}
    assert offered, "no flag with choices"
    for (command, flag), choices in offered.items():
        assert choices == (DTYPES if (command, flag) == ("check", "--dtype") else CHOICES[flag]), (command, flag)


@pytest.mark.parametrize("argv,given", [
    (["--vocab-keep", "0"], dict(vocab_keep="0")), (["--ffn-keep", "1"], dict(ffn_keep="1")),
    (["--target-params", "1.5"], dict(target_params=1.5)), (["--plan-trials", "-2"], dict(plan_trials=-2)),
    (["--vocab-prior", "-1"], dict(vocab_prior=-1.0)),
])
def test_the_parser_and_the_method_refuse_with_one_rule(argv, given, capsys):
    """The command line refuses a bad value when parsing it, with the message Method gives in Python."""
    with pytest.raises(ValueError) as caught:
        Method(**given)
    flag, problem = str(caught.value).split(" ", 1)
    with pytest.raises(SystemExit) as exited:
        cli._parser().parse_args(["prune", "m", "--out", "o", *argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"argument {flag}: {problem} (see" in err, err
