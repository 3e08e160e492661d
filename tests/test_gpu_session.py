"""bench/gpu_session.sh, checked without a GPU: every command it runs takes the flags it is given.

A lease of a GPU machine is a few minutes, used by one command that runs this script; a benchmark that stops
at a misspelt flag or system there costs its whole time box. So each command of the script is read out of
it here, its shell variables given their defaults, and handed to the same argument checks it meets on the
GPU: the benchmarks' `main` (which, without a GPU, stops right after checking its flags), netdsl's own
command-line parser, and the test files pytest is given.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netdsl.cli.main import _parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
# the end of a command's arguments: a redirection, a pipe or the end of a list
_END = re.compile(r"^(\d?>|>|\||&&|;|\))")


def _commands() -> list[tuple[str, list[str]]]:
    """(program, arguments) of each `python3 ...` the script runs, its variables at their defaults."""
    text = SCRIPT.read_text(encoding="utf-8").replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for match in re.finditer(r"python3 (bench/\w+\.py|-m netdsl|-m pytest)\b(.*)", line):
            rest = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", match.group(2))  # ${TEST_S:-150} -> 150
            rest = rest.replace("$OUT", "gpu-out").replace("$layout", "auto").replace("$workers", "")
            words = []
            for word in shlex.split(rest, comments=True):
                if _END.match(word):
                    break
                words.append(word)
            found.append((match.group(1), words))
    return found


COMMANDS = _commands()
BENCH = [(program, words) for program, words in COMMANDS if program.startswith("bench/")]
NETDSL = [words for program, words in COMMANDS if program == "-m netdsl"]
PYTEST = [words for program, words in COMMANDS if program == "-m pytest"]


def test_the_script_is_read_whole():
    """The reader above finds the script's commands: each part's benchmarks, netdsl's and pytest's."""
    scripts = {program for program, _ in BENCH}
    assert scripts == {
        "bench/alexnet_gpu.py", "bench/train_gpu.py", "bench/train.py", "bench/conv_sweep.py", "bench/step_sweep.py",
        "bench/train_memory.py",
    }  # fmt: skip
    assert {words[0] for words in NETDSL} == {"tune", "run"}
    assert len(PYTEST) == 2
    assert len(BENCH) > 15


SHELL_SCRIPTS = sorted([*ROOT.glob("bench/*.sh"), *(path for path in (ROOT / ".ci").iterdir() if path.is_file())])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_the_scripts_are_valid_shell(script: Path):
    """This one, bench/triton_compat.sh and CI's: run only where they cost the most (a GPU lease, CI)."""
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_bad_part_is_refused_before_anything_runs(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT), "everything"], cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert done.returncode == 2 and "usage" in done.stderr
    assert not any(tmp_path.iterdir()), "a refused run wrote nothing"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_machine_without_lark_is_told_at_once(tmp_path):
    """The GPU machines have no lark and no registry: without its wheel in .whl/ the script stops in a second."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text("#!/bin/sh\nexit 1\n")  # a Python that imports nothing: lark is missing
    python.chmod(0o755)
    done = subprocess.run(
        ["bash", str(SCRIPT), "tests"], cwd=tmp_path, capture_output=True, text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out")},
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "pip download --no-deps -d .whl lark" in done.stderr
    assert not (tmp_path / "out" / "env.txt").exists(), "it stopped before looking at the GPU"


def _load(program: str):
    spec = importlib.util.spec_from_file_location(f"_session_{Path(program).stem}", ROOT / program)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("program, words", BENCH, ids=[" ".join([p, *w])[:80] for p, w in BENCH])
def test_each_benchmark_takes_its_flags(program, words, monkeypatch, tmp_path, capsys):
    """Without a GPU each benchmark checks its flags, says there is nothing to time and returns 4 (NO_GPU)."""
    monkeypatch.chdir(tmp_path)  # a TSV, if anything wrote one, lands here
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    module = _load(program)
    if hasattr(module, "cpu_table"):  # bench/train.py times its CPU table before the GPU's: not wanted here
        monkeypatch.setattr(module, "cpu_table", lambda *args: [])
    assert module.main(words) == 4  # bench/timing.py's NO_GPU: nothing was timed
    assert "no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.parametrize("words", NETDSL, ids=[" ".join(w)[:80] for w in NETDSL])
def test_each_netdsl_command_takes_its_flags(words):
    args = _parser().parse_args(words)
    assert args.command == words[0]


@pytest.mark.parametrize("words", PYTEST, ids=[f"pytest-{i}" for i in range(len(PYTEST))])
def test_each_test_file_it_runs_exists(words):
    files = [word for word in words if word.endswith(".py")]
    assert files
    missing = [name for name in files if not (ROOT / name).is_file()]
    assert not missing


@pytest.mark.parametrize(
    "program, words",
    [
        ("bench/alexnet_gpu.py", ["--systems", "netdsl-grapf"]),
        ("bench/alexnet_gpu.py", ["--precisions", "fp16x"]),
        ("bench/conv_sweep.py", ["--dtypes", "tf32x4"]),
        ("bench/conv_sweep.py", ["--layers", "conv6"]),
        ("bench/conv_sweep.py", ["--configs", "0,999"]),
        ("bench/step_sweep.py", ["--steps", "fc9"]),
        ("bench/train_gpu.py", ["--systems", "netdsl,keras"]),
        ("bench/train.py", ["--nets", "lenet6"]),
    ],
)
def test_a_misspelt_flag_fails_without_a_gpu(program, words, monkeypatch, capsys):
    """The checks above can fail: a wrong name stops each benchmark before it looks for a GPU."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        _load(program).main(words)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "unknown" in error or "no hand-written model" in error
