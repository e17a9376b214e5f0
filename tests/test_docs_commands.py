"""Every command the README and docs/*.md show still runs, and every config they name exists.

Each ``python tools/...`` or ``python benchmarks/...`` command (code blocks and inline code) is run with ``--help``;
the LightningCLI tools (``tools/train.py``, ``tools/pretrain.py``) are run with the command's own arguments plus
``--print_config``, which parses the config and every override without building anything. All of them run in one
worker subprocess, so torch, timm and Lightning are imported once: the whole check takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LIGHTNING_TOOLS = ("tools/train.py", "tools/pretrain.py")
DEFAULT_CONFIG = {"tools/train.py": "configs/default.yaml"}  # what tools/train.py runs when given no arguments
COMMAND = re.compile(r"python (?:tools|benchmarks)/\S+\.py\b.*")
CONFIG_PATH = re.compile(r"configs/[\w./-]+\.yaml")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")
TEST_COMMAND = 'pip install -e ".[dev]" && python -m pytest -q -p no:cacheprovider'


def doc_commands(text: str) -> list[str]:
    """The tool and benchmark commands of one markdown text: code-block lines (with ``\\`` continuations) and
    inline code spans, from ``python`` on, without a trailing shell comment."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            found += COMMAND.findall(line.split("  #")[0].split(" # ")[0])
    for span in INLINE.findall(FENCE.sub("", text)):
        found += COMMAND.findall(span)
    return [" ".join(command.split()) for command in found]


def invocation(command: str) -> tuple[str, ...]:
    """What the check runs for one documented command: the script and its arguments."""
    script, *args = shlex.split(command)[1:]
    if script not in LIGHTNING_TOOLS:
        return (script, "--help")
    if any(arg in ("--help", "--print_config") or arg.endswith(".help") for arg in args):
        return (script, *args)
    if "--config" not in args and script in DEFAULT_CONFIG:
        args = ["--config", DEFAULT_CONFIG[script], *args]
    return (script, *args, "--print_config")


COMMANDS = sorted({(path.relative_to(ROOT).as_posix(), command)
                   for path in DOC_FILES for command in doc_commands(path.read_text())})
INVOCATIONS = sorted({invocation(command) for _, command in COMMANDS})

# Runs each invocation like ``python SCRIPT ARGS`` (as __main__, script folder first on sys.path) and records its
# exit code and the tail of its output; an exception is exit code 1 with the traceback.
WORKER = textwrap.dedent("""
    import contextlib, io, json, runpy, sys, traceback
    jobs_file, results_file = sys.argv[1:3]
    jobs, results = json.loads(open(jobs_file).read()), []
    for job in jobs:
        out, code = io.StringIO(), 0
        sys.argv, saved_path = list(job), list(sys.path)
        sys.path.insert(0, str(__import__("pathlib").Path(job[0]).resolve().parent))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                runpy.run_path(job[0], run_name="__main__")
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
                if not isinstance(exit.code, (int, type(None))):
                    print(exit.code)
            except BaseException:
                code = 1
                traceback.print_exc()
        sys.path[:] = saved_path
        results.append({"code": code, "output": out.getvalue()[-3000:]})
    open(results_file, "w").write(json.dumps(results))
""")


@pytest.fixture(scope="module")
def missing_root_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("benchmark") / "omniglot"


@pytest.fixture(scope="module")
def missing_root_job(missing_root_out) -> tuple[str, ...]:
    return ("tools/fewshot_benchmark.py", "--config", "configs/benchmark/omniglot_one_shot.yaml",
            "--out", str(missing_root_out))


@pytest.fixture(scope="module")
def results(tmp_path_factory, missing_root_job) -> dict[tuple[str, ...], dict]:
    """Exit code and output of every invocation (and of the missing-root check), from one worker process."""
    folder = tmp_path_factory.mktemp("docs_commands")
    jobs = [*INVOCATIONS, missing_root_job]
    (folder / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", WORKER, str(folder / "jobs.json"), str(folder / "results.json")],
                   cwd=ROOT, env=env, check=True, timeout=300)
    return dict(zip(jobs, json.loads((folder / "results.json").read_text()), strict=True))


def test_the_docs_show_commands_for_every_tool():
    scripts = {shlex.split(command)[1] for _, command in COMMANDS}
    tools = {f"tools/{path.name}" for path in (ROOT / "tools").glob("*.py")}
    assert tools <= scripts, f"tools without a documented command: {sorted(tools - scripts)}"
    assert len(COMMANDS) >= 40 and len(INVOCATIONS) >= 25


@pytest.mark.parametrize("job", INVOCATIONS, ids=[" ".join(job) for job in INVOCATIONS])
def test_documented_command_runs(job, results):
    assert results[job]["code"] == 0, results[job]["output"]


@pytest.mark.parametrize("doc", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_every_named_config_exists(doc):
    named = sorted(set(CONFIG_PATH.findall(doc.read_text())))
    missing = [path for path in named if not (ROOT / path).is_file()]
    assert not missing, f"{doc.name} names configs that do not exist: {missing}"


ROOTED_DATASETS = ("imagefolder", "coco", "digits+omniglot", "omniglot")  # their data is not in the repository


def _needs_root(config: dict) -> bool:
    section = config.get("data", config)  # LightningCLI configs have a data: section, benchmark configs are flat
    rooted = section.get("dataset") in ROOTED_DATASETS or config.get("protocol") == "omniglot"
    return rooted and not section.get("root")


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{doc}: {command}" for doc, command in COMMANDS])
def test_documented_command_passes_the_root_its_config_needs(doc, command):
    args = shlex.split(command)[2:]
    configs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--config"]
    if any(_needs_root(yaml.safe_load((ROOT / path).read_text())) for path in configs if (ROOT / path).is_file()):
        assert "--data.root" in args or "--root" in args, f"{doc}: {command} needs --data.root or --root"


def test_readme_keeps_the_test_command_ci_runs():
    assert TEST_COMMAND in (ROOT / "README.md").read_text().splitlines()


def test_shipped_configs_name_no_data_folder_outside_the_repository():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        for line in path.read_text().splitlines():
            value = line.split("#")[0].partition(":")[2].strip()
            assert not value.startswith(("..", "/")), f"{path.relative_to(ROOT)}: {line.strip()}"


def test_a_benchmark_without_its_root_fails_in_one_line_before_any_work(results, missing_root_job, missing_root_out):
    result = results[missing_root_job]
    lines = result["output"].strip().splitlines()
    assert result["code"] == 2 and len(lines) == 1, result["output"]
    assert "root" in lines[0] and "--root DIR" in lines[0] and "omniglot_one_shot.yaml" in lines[0]
    assert not missing_root_out.exists()
