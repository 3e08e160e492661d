"""The installed package carries its grammar and example nets: a wheel built from the tree works
outside the source tree (where the in-place fallbacks cannot be found)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("netdsl-*.whl")
    return path


def test_wheel_ships_grammar_and_nets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "netdsl/grammars/net.lark" in names
    assert "netdsl/nets/alexnet.net" in names
    assert "netdsl/cli.py" in names


def test_installed_package_runs_outside_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import netdsl, netdsl.cli;"
        "assert netdsl.__file__.startswith(sys.argv[1]), netdsl.__file__;"
        "sys.exit(netdsl.cli.main(['info']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(site)], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "60,965,224" in result.stdout
