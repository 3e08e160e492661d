"""Pictures in CI: `.ci/setup` installs Graphviz's `dot` (through `.ci/graphviz`) where apt-get can do it
without asking, and never fails over it; where `dot` is missing, `netdsl graph` says what to install.

The set-up script runs here against stand-ins for `id`, `sudo`, `apt-get` and `dot` on an otherwise empty
PATH, which record what they are asked to do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netdsl.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "graphviz"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(sys.platform == "win32" or BASH is None, reason="a POSIX shell script")


def _run(tmp_path: Path, *, uid: int = 0, apt: int | None = 0, sudo: bool = False, dot: bool = False):
    """Runs .ci/graphviz as user `uid`, with an apt-get exiting with `apt` (None: no apt-get), a sudo that
    works without a password or none, and `dot` installed or not. Returns the result and what the stand-ins
    were asked to do."""
    tools = tmp_path / "bin"
    tools.mkdir()
    log = tmp_path / "log"
    log.touch()

    def tool(name: str, body: str) -> None:
        (tools / name).write_text(f"#!/bin/sh\n{body}\n")
        (tools / name).chmod(0o755)

    tool("id", f"echo {uid}")
    tool("true", "exit 0")
    if apt is not None:
        tool("apt-get", f'echo "apt-get $*" >> "{log}"\nexit {apt}')
    if sudo:
        tool("sudo", f'echo "sudo $*" >> "{log}"\n[ "$1" = -n ] && shift\nexec "$@"')
    if dot:
        tool("dot", "exit 0")
    result = subprocess.run([BASH, str(SCRIPT)], env={"PATH": str(tools)}, capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines()


def test_setup_runs_the_graphviz_step_and_goes_on_if_it_fails():
    setup = (ROOT / ".ci" / "setup").read_text(encoding="utf-8")
    assert "bash .ci/graphviz || true" in setup
    assert setup.index("bash .ci/graphviz") > setup.index("pip install -e")


def test_nothing_is_installed_where_dot_is(tmp_path):
    result, asked = _run(tmp_path, dot=True)
    assert result.returncode == 0 and asked == [] and result.stderr == ""


def test_root_installs_graphviz_with_apt_get(tmp_path):
    result, asked = _run(tmp_path)
    assert result.returncode == 0
    assert asked == ["apt-get install -y -q graphviz"]
    assert "installed Graphviz's dot" in result.stderr


def test_a_failed_install_reads_the_package_lists_again_and_never_fails_the_setup(tmp_path):
    result, asked = _run(tmp_path, apt=100)
    assert result.returncode == 0
    assert asked == ["apt-get install -y -q graphviz", "apt-get update -q"]
    assert "warning: apt-get install graphviz failed" in result.stderr


def test_a_user_installs_through_sudo_without_a_password(tmp_path):
    result, asked = _run(tmp_path, uid=1000, sudo=True)
    assert result.returncode == 0
    assert asked == ["sudo -n true", "sudo -n apt-get install -y -q graphviz", "apt-get install -y -q graphviz"]


def test_a_user_without_sudo_is_told_what_to_run(tmp_path):
    result, asked = _run(tmp_path, uid=1000)
    assert result.returncode == 0 and asked == []
    assert "needs root (sudo apt-get install graphviz)" in result.stderr


def test_without_apt_get_nothing_is_tried(tmp_path):
    result, asked = _run(tmp_path, apt=None)
    assert result.returncode == 0 and asked == []
    assert "no apt-get" in result.stderr


def test_netdsl_graph_says_what_to_install_where_dot_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "alexnet.svg"
    assert main(["--color=never", "graph", str(ROOT / "nets" / "alexnet.net"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{out}: error: writing .svg needs Graphviz's `dot`, which is not installed")
    for advice in ("apt-get install graphviz", "brew install graphviz", "graphviz.org/download", "write a .dot file"):
        assert advice in err
    assert "Traceback" not in err and not out.exists()
    assert main(["graph", str(ROOT / "nets" / "alexnet.net"), "-o", str(tmp_path / "alexnet.dot")]) == 0
