"""bench/'s shell scripts, checked where they cost nothing: triton_compat.sh's --help prints its usage and installs
nothing (it downloads a few GB otherwise), and gpu_session.sh on a machine without a GPU says at once that nothing
was tested or timed, with exit status 4, before any stage starts."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / "bench" / "triton_compat.sh"
SESSION = ROOT / "bench" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def fake_python(folder: Path, script: str) -> Path:
    """A `python3` (shell script) in `folder`, for the shell scripts to find first on PATH."""
    folder.mkdir()
    python = folder / "python3"
    python.write_text(f"#!/bin/sh\n{script}\n")
    python.chmod(0o755)
    return python


def run_compat(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """triton_compat.sh with a Python that records being called and an environment that does not exist yet."""
    python = fake_python(tmp_path / "bin", f'echo "$@" >>"{tmp_path}/called"')
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "VENV": str(tmp_path / "venv"), "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(COMPAT), *arguments], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_triton_compat_help_prints_its_usage_and_installs_nothing(tmp_path, flag):
    done = run_compat(tmp_path, flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The kernels against the Triton and PyTorch of the GPU machines")
    assert "bash bench/triton_compat.sh --help" in done.stdout and "Exit status 1 when" in done.stdout
    assert "set -u" not in done.stdout and not done.stdout.startswith("#")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bin"], "no venv, no output, no Python called"


@pytest.mark.parametrize("arguments", [["--frob"], ["all"], ["--help", "extra"]])
def test_triton_compat_refuses_unknown_arguments(tmp_path, arguments):
    done = run_compat(tmp_path, *arguments)
    assert done.returncode == 2
    assert "unknown argument" in done.stderr and "usage: bash bench/triton_compat.sh [--help]" in done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bin"]


def test_gpu_session_without_a_gpu_stops_before_any_stage(tmp_path):
    """lark is there (it imports), torch finds no GPU: env.txt is written, then exit status 4 and one line saying
    nothing was tested or timed; no background compile, test or benchmark started."""
    fake_python(tmp_path / "bin", 'if [ "$2" = "import lark" ]; then exit 0; fi\necho "no GPU" >&2\nexit 1')
    (tmp_path / "netdsl").mkdir()  # the script links the source tree into the package folder
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(SESSION)], cwd=tmp_path, capture_output=True, text=True,
        env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "OUT": str(out)},
    )  # fmt: skip
    assert done.returncode == 4, done.stderr
    assert f"gpu_session.sh: no CUDA GPU here: nothing tested or timed (the machine is in {out}/env.txt)" in done.stderr
    assert sorted(path.name for path in out.iterdir()) == ["env.txt"]
