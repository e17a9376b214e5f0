"""The ``tools/train.py`` and ``tools/pretrain.py`` command lines: parse once, choose the task, run it.

Every field of the YAML configs under ``configs/`` can be overridden on the command line (``--model.lora.r 16``)
and ``--print_config`` shows the resolved config. The task is read from the parsed config: a ``model:`` section
with a ``detector:`` key (fcos, retinanet, faster_rcnn) is few-shot detection (:mod:`.detection`), anything else
classification (:mod:`.classification`). Each ``--config`` file is read once and its text handed on, so the
chooser here and the task's LightningCLI parse the same text with jsonargparse (configs merged in order, then
the flags) and agree on what the config says.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from .base import RUN_OPTIONS, VisionLoraCLI

TASKS = ("classification", "detection")
# What a bad config raises while it is parsed and built: values out of range, missing files and data roots.
SETUP_ERRORS = (ValueError, OSError, ArgumentError)  # ArgumentError: a key or value the parser refuses
# Flags that print and exit: the task's own parser must see them as they were typed.
INFORMATIONAL = ("-h", "--help", "--print_config")
SECTIONS = ("trainer", "model", "data", "optimizer", "lr_scheduler")

__all__ = ["TASKS", "VisionLoraCLI", "command_line", "inline_configs", "main", "task_of"]


def main(args: list[str] | None = None) -> dict:
    """Parse the arguments (``sys.argv[1:]`` when None), then fit, test and write the run directory of the task.

    Returns the results row the run printed. A bad config raises (ValueError, FileNotFoundError, ...) before
    anything trains; :func:`command_line` turns that into one line.
    """
    task, cli = build(args)
    return task.run(cli)


def command_line(args: list[str] | None = None) -> int:
    """:func:`main` for ``tools/train.py`` and ``tools/pretrain.py``; returns the exit code.

    An error while parsing the configs and building the model, data and trainer (a value out of range, a missing
    file or data root) is printed as one line ``error: ...`` and gives exit code 2, with nothing written; an error
    once fitting has started keeps its traceback.
    """
    try:
        task, cli = build(args)
    except SETUP_ERRORS as error:
        print(f"error: {setup_message(error)}", file=sys.stderr)
        return 2
    task.run(cli)
    return 0


def build(args: list[str] | None = None) -> tuple[ModuleType, VisionLoraCLI]:
    """The task module (:mod:`.classification` or :mod:`.detection`) and its CLI, built and ready to run."""
    argv = inline_configs(list(sys.argv[1:] if args is None else args))
    # The inlined argv is handed on on purpose; LightningCLI would warn (printing every config's text) about it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)
    if task_of_inlined(argv) == "detection":
        from . import detection as task  # torchvision's detectors load only when asked for
    else:
        from . import classification as task
    return task, task.build(argv)


def setup_message(error: BaseException) -> str:
    """One line for a setup error: the innermost cause's message (jsonargparse wraps what a class raised).

    ``LoraConfig.r must be a positive integer, got 0`` rather than jsonargparse's "Does not validate against any
    of the Union subtypes" and the whole namespace.
    """
    if isinstance(error, ArgumentError):
        return argument_message(str(error))
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def inline_configs(args: list[str]) -> list[str]:
    """``args`` with every ``--config FILE`` (or ``--config=FILE``) replaced by the file's text, read once.

    jsonargparse takes a config's YAML text where it takes its path, so the task chooser and the task's
    LightningCLI parse the very same text and no file is read twice.

    Raises:
        FileNotFoundError: A ``--config`` file that does not exist (named).
    """
    inlined, index = [], 0
    while index < len(args):
        arg = args[index]
        if arg == "--config" and index + 1 < len(args):
            inlined += ["--config", _read_config(args[index + 1])]
            index += 2
            continue
        inlined.append("--config=" + _read_config(arg.removeprefix("--config=")) if arg.startswith("--config=")
                       else arg)
        index += 1
    return inlined


def task_of(args: list[str]) -> str:
    """The task a command line runs: ``detection`` when its parsed ``model`` section names a ``detector``."""
    return task_of_inlined(inline_configs(args))


def task_of_inlined(args: list[str]) -> str:
    """:func:`task_of` for arguments whose configs are inlined already (see :func:`inline_configs`)."""
    shown = [a for a in args if a.split("=")[0] not in INFORMATIONAL]
    try:
        model = vars(_dispatch_parser().parse_args(shown)).get("model") or {}
    except ArgumentError:  # not a training config at all: the classification parser says what is wrong with it
        return "classification"
    init_args = model.get("init_args") if isinstance(model.get("init_args"), dict) else model
    return "detection" if init_args.get("detector") is not None else "classification"


def argument_message(text: str) -> str:
    """One line for what jsonargparse refused: ``--model.lora.r: expected int, got zero`` or ``--model.lora.rank: no
    such option`` from its nested report (the keys from the outermost to the innermost ``Parser key``, the first
    type that is not None, the value)."""
    keys = re.findall(r'Parser key "([^"]+)"', text)
    if not keys:  # unrecognized arguments and the like: already one sentence
        return "; ".join(line.strip() for line in text.splitlines() if line.strip())
    unknown = re.findall(r"""(?:Option '([^']+)' is not accepted|Key "([^"]+)" is not expected)""", text)
    if unknown:
        name = next(part for part in unknown[0] if part)
        return f"--{'.'.join(keys)}.{name}: no such option (--help lists every option)"
    expected = [found for found in re.findall(r"Expected an? (.+?)(?:\. Got value: .*)?$", text, re.MULTILINE)
                if "NoneType" not in found]
    value = re.findall(r"Got value: (.+)$", text, re.MULTILINE) or re.findall(r"Given value: (.+)$", text, re.MULTILINE)
    wanted = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", expected[0]) if expected else "another value"
    return f"--{'.'.join(keys)}: expected {wanted}, got {value[0] if value else 'an invalid value'}"


def _read_config(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config: no such file {path}")
    return Path(path).read_text(encoding="utf-8")


def _dispatch_parser() -> ArgumentParser:
    """A parser that takes any key under the config sections and the run options, typed as YAML gives them.

    It only chooses the task: nested keys are not merged (a ``--model.lora.r`` flag replaces ``model.lora``), which
    does not matter for ``model.detector``; the task's own parser does the real, typed parse.
    """
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    for section in SECTIONS:
        parser.add_argument(f"--{section}", type=dict[str, Any] | None, default=None)
    for option in ("seed_everything", *RUN_OPTIONS):
        parser.add_argument(f"--{option}", type=Any, default=None)
    return parser
