"""The installed package carries its grammar and example nets: a wheel built from the tree ships them, and
`pip install .` into a fresh virtual environment gives a `netdsl` that works outside the source tree (where
the in-place fallbacks cannot be found). Both build from a copy of the tree, so that setuptools' build/ and
egg-info land in the copy, not in the repository."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the build reads (pyproject.toml's packages, package-dir and readme).
SOURCE = ("pyproject.toml", "README.md", "netdsl", "grammars", "nets", "codegen")
# The paper's AlexNet totals (tests/test_nets.py): parameters, multiply-accumulates, neurons.
ALEXNET_TOTALS = ("60,965,224", "724,406,816", "659,272")


def copy_source(dest: Path) -> Path:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, dest / name)
    return dest


def clean_env() -> dict[str, str]:
    """No PYTHONPATH (it could point back into the repository) and no pip index or version check."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = copy_source(tmp_path_factory.mktemp("wheel-src") / "netdsl")
    out = tmp_path_factory.mktemp("wheel")
    options = ["--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out)]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", *options, str(source)],
        check=True,
        capture_output=True,
        env=clean_env(),
    )
    (path,) = out.glob("netdsl-*.whl")
    return path


def test_wheel_ships_grammar_and_nets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "netdsl/grammars/net.lark" in names
    assert "netdsl/nets/alexnet.net" in names
    assert "netdsl/cli/main.py" in names


def test_pip_install_into_a_fresh_venv_finds_the_grammar(tmp_path):
    """`pip install <tree>` into a new venv, offline; then the venv's `netdsl` checks and describes the
    installed nets from another directory, with the source copy gone."""
    source = copy_source(tmp_path / "src" / "netdsl")
    venv = tmp_path / "venv"
    env = clean_env()
    # --without-pip skips ensurepip (seconds); pip, setuptools and netdsl's dependencies come from the
    # interpreter running the tests: its system site-packages, or, when it runs in a venv (as .venv),
    # that venv's site-packages through a .pth file.
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, env=env
    )
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    outer = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (Path(purelib) / "outer_site_packages.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")

    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(source)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(tmp_path / "src")  # nothing of the tree is left to fall back on

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=elsewhere, capture_output=True, text=True, env=env, check=False)
        assert result.returncode == 0, result.stderr
        return result

    package = Path(run(str(python), "-c", "import netdsl; print(netdsl.__file__)").stdout.strip()).parent
    assert package == Path(purelib) / "netdsl"
    assert (package / "grammars" / "net.lark").is_file()
    assert not (package.parent / "grammars").exists()  # the source-tree fallback of netdsl.lang.parse

    netdsl = str(venv / "bin" / "netdsl")
    nets = sorted((package / "nets").glob("*.net"))
    assert {p.name for p in nets} >= {"alexnet.net", "alexnet_1gpu.net", "vgg16.net", "lenet5.net"}
    for net in nets:
        assert run(netdsl, "check", str(net)).stdout == ""
    for args in ([], [str(package / "nets" / "alexnet.net")], [str(package / "nets" / "alexnet_1gpu.net")]):
        out = run(netdsl, "info", *args).stdout
        total = next(line for line in out.splitlines() if line.startswith("total "))
        assert all(figure in total for figure in ALEXNET_TOTALS), total
        assert "290,400" in out  # conv1's neurons
