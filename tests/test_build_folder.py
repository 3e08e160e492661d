"""A build folder is replaced whole (netdsl/compiler/compile.py: write_build): kernels/, plan.json, report.txt and
train/ are written into a folder beside it and swapped in at once, so that the path always holds the earlier build
whole or the new one whole, the files a user put there are kept, and what a killed compile leaves is cleared up
(or put back) by the next one.

A kill is simulated without signals: every rename and removal of a compile is intercepted and, before it runs, the
folder holding the build is copied, which is what a kill -9 at that instant leaves on disk.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import netdsl.compiler.compile as compile_module
import netdsl.files
from netdsl.cli.main import main
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.passes import Options
from netdsl.compiler.train_plan import compile_training
from netdsl.errors import NetError

TINY = "net tiny\ninput image: 1 x 8 x 8\na = conv(image, 4, size=3) | relu\nb = fc(a, 3)\n"
USER_FILES = {"mine.txt": b"a user's file", "runs/x.npy": b"a user's folder", ".hidden": b"hidden, but the user's"}
SIBLING = re.compile(r"\.build\.netdsl-(new|old)\.[0-9a-f]{16}")


@pytest.fixture
def net(tmp_path) -> Path:
    path = tmp_path / "tiny.net"
    path.write_text(TINY)
    return path


class Build:
    """A compile of the tiny net at a dtype, with its training program, written by `write(out)`."""

    def __init__(self, net: Path, dtype: str) -> None:
        self.options = Options(batch=2, dtype=dtype)
        self.compiled = compile_net(net, self.options)
        self.training = compile_training(net, self.options)

    def write(self, out: Path) -> Path:
        return write_build(self.compiled, out, self.options, training=self.training)


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def add_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def netdsl_files(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name not in USER_FILES}


def intercepted(monkeypatch, before: Callable[[str], None]) -> None:
    """`before(what)` is called ahead of every rename and removal (os.rename, os.replace, renameat2, os.unlink,
    os.rmdir: shutil.rmtree's too) until the test ends."""
    for module, name in ((os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (netdsl.files, "_renameat2")):
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            before(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)


def kill_states(tmp_path: Path, monkeypatch, write: Callable[[], object]) -> list[Path]:
    """Copies of tmp_path/root as a kill before each rename or removal of `write()` would leave it."""
    root, states, busy = tmp_path / "root", [], []

    def snapshot(what: str) -> None:
        if busy:  # the copy's own calls
            return
        busy.append(what)
        try:
            state = tmp_path / f"kill{len(states):03d}"  # beside root: the plan names the net by the same path
            shutil.copytree(root, state, symlinks=True)
            states.append(state)
        finally:
            busy.clear()

    with monkeypatch.context() as patch:
        intercepted(patch, snapshot)
        write()
    return states


def layout(root: Path) -> tuple:
    """The shape of what a kill left: the entries of root, and of each folder in it."""
    return tuple((name, tuple(sorted(os.listdir(root / name)))) for name in sorted(os.listdir(root)))


def where_user_files_are(root: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, data in USER_FILES.items():
        for path in root.rglob(Path(name).name):
            if path.is_file() and path.read_bytes() == data and path.relative_to(root).as_posix().endswith(name):
                assert name not in found, f"{name} twice: {found[name]} and {path}"
                found[name] = path.relative_to(root).parts[0]
    return found


@pytest.mark.parametrize("one_step", [True, False], ids=["exchange", "two-renames"])
def test_a_compile_killed_anywhere_leaves_one_whole_build_and_the_next_clears_up(tmp_path, net, monkeypatch, one_step):
    """fp32 then bf16, training included: at every instant `build` is the fp32 build whole or the bf16 build whole
    (its plan.json and train/plan.json agree); the user's files are in it or, killed while they move, in the
    earlier build's hidden folder. The next compile gives the new build whole, the user's files back in it, and
    nothing beside it. Where two folders cannot be swapped in one step (`one_step` False) there is an instant
    with no `build` at all: the next compile puts the earlier one back first."""
    if not one_step:
        monkeypatch.setattr(compile_module, "exchange", lambda first, second: False)
    fp32, bf16 = Build(net, "fp32"), Build(net, "bf16")
    out = tmp_path / "root" / "build"
    fp32.write(out)
    earlier = files_of(out)
    add_user_files(out)
    states = kill_states(tmp_path, monkeypatch, lambda: bf16.write(out))
    assert len(states) > 20
    new = netdsl_files(files_of(out))
    assert new != earlier and files_of(out) == {**new, **USER_FILES}
    assert os.listdir(tmp_path / "root") == ["build"]
    missing = 0
    for state in states:
        build = state / "build"
        if not build.exists():
            missing += 1
            (old,) = [name for name in os.listdir(state) if (match := SIBLING.fullmatch(name)) and match[1] == "old"]
            assert netdsl_files(files_of(state / old)) == earlier, state.name
        else:
            assert netdsl_files(files_of(build)) in (earlier, new), state.name
            plans = [json.loads((build / name).read_text()) for name in ("plan.json", "train/plan.json")]
            assert plans[0]["dtype"] == plans[1]["dtype"], state.name
        assert sorted(where_user_files_are(state)) == sorted(USER_FILES), state.name
        assert all(name == "build" or SIBLING.fullmatch(name) for name in os.listdir(state)), state.name
    assert missing == (0 if one_step else 1)

    shapes = {}
    for state in states:
        shapes.setdefault(layout(state), state)
    for state in shapes.values():
        if not (state / "build").exists():  # a compile that fails still puts the earlier build back
            with monkeypatch.context() as patch:
                patch.setattr(compile_module, "write_atomic", fail_to_write)
                with pytest.raises(NetError, match="No space left"):
                    bf16.write(state / "build")
            assert files_of(state / "build") == {**earlier, **USER_FILES}, state.name
        bf16.write(state / "build")
        assert files_of(state / "build") == {**new, **USER_FILES}, state.name
        assert os.listdir(state) == ["build"], state.name


def fail_to_write(path, text):
    raise NetError(f"cannot write {path}: No space left on device", where=str(path))


def test_a_compile_that_fails_at_any_rename_changes_nothing_or_finishes(tmp_path, net, monkeypatch):
    """The rename or removal number n fails (n = 1, 2, ...): the compile raises a NetError and the folder is the
    earlier build, every byte, the user's files in it and nothing left beside it; or the failure came after the
    new build was in place (a user's file that could not move, a file that could not be removed), and the build
    is the new one whole; the next compile then finishes the job."""
    fp32, bf16 = Build(net, "fp32"), Build(net, "bf16")
    out = tmp_path / "root" / "build"
    fp32.write(out)
    earlier = files_of(out)
    add_user_files(out)
    calls = []
    with monkeypatch.context() as patch:
        intercepted(patch, calls.append)
        bf16.write(out)
    new = netdsl_files(files_of(out))
    outcomes = set()
    for n in range(1, len(calls) + 1):
        shutil.rmtree(tmp_path / "root")
        fp32.write(out)
        add_user_files(out)
        count = []

        def fail_at_n(what, n=n, count=count):
            count.append(what)
            if len(count) == n:
                raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            intercepted(patch, fail_at_n)
            try:
                bf16.write(out)
                finished = True
            except NetError as error:
                assert "No space left on device" in str(error)
                finished = False
        outcomes.add(finished)
        if not finished:
            assert files_of(out) == {**earlier, **USER_FILES}, calls[n - 1]
            assert os.listdir(tmp_path / "root") == ["build"], calls[n - 1]
        else:
            assert netdsl_files(files_of(out)) == new, calls[n - 1]
        bf16.write(out)
        assert files_of(out) == {**new, **USER_FILES} and os.listdir(tmp_path / "root") == ["build"]
    assert outcomes == {True, False}


def test_compile_cli_writes_train_in_the_same_swap_and_without_train_removes_it(tmp_path, net, monkeypatch, capsys):
    """`compile --train` then `compile --train --dtype bf16` killed anywhere: plan.json and train/plan.json always
    name one dtype, and no staging folder is left in the build. A compile without --train removes train/."""
    out = tmp_path / "root" / "build"
    args = ["compile", str(net), "--train", "--no-sm90", "--batch", "2", "-o", str(out)]
    assert main(args) == 0
    (out / "mine.txt").write_text("mine")
    states = kill_states(tmp_path, monkeypatch, lambda: main([*args, "--dtype", "bf16"]))
    assert len(states) > 10
    for state in states:
        build = state / "build"
        plan, train = (json.loads((build / name).read_text()) for name in ("plan.json", "train/plan.json"))
        assert plan["dtype"] == train["dtype"], state.name
        assert all(not name.startswith(".") for name in os.listdir(build)), state.name
    assert json.loads((out / "train" / "plan.json").read_text())["dtype"] == "bf16"
    assert "wrote " in capsys.readouterr().out
    assert main(args[:2] + args[3:]) == 0
    assert sorted(os.listdir(out)) == ["kernels", "mine.txt", "plan.json", "report.txt"]
    assert os.listdir(out.parent) == ["build"]


def test_compile_into_the_working_directory(tmp_path, net, monkeypatch, capsys):
    """`-o .` from inside the build folder: the report is read back from the new build."""
    out = tmp_path / "build"
    assert main(["compile", str(net), "--no-sm90", "-o", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.chdir(out)
    assert main(["compile", str(net), "--no-sm90", "--dtype", "bf16", "-o", "."]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith((out / "report.txt").read_text()) and "wrote ./kernels" in printed
    assert json.loads((out / "plan.json").read_text())["dtype"] == "bf16"


def test_leftovers_of_earlier_versions_go_and_the_users_entries_stay(tmp_path, net):
    """Staging that earlier netdsl versions left inside the build folder is not carried into the new build; every
    other entry is the user's and is, hidden ones and folders included."""
    build = Build(net, "fp32")
    out = build.write(tmp_path / "build")
    add_user_files(out)
    leftovers = [".kernels.0123456789abcdef", ".kernels-old.0123456789abcdef", ".train.0123456789abcdef"]
    for name in leftovers:
        (out / name).mkdir()
        (out / name / "x.py").write_text("stale")
    (out / ".plan.json.0123456789abcdef").write_text("{")
    (out / ".out.npy.0123456789abcdef").write_text("a save under way")  # `run --save` writing: the user's
    build.write(out)
    names = sorted(os.listdir(out))
    assert names == sorted(["kernels", "plan.json", "report.txt", "train", "mine.txt", "runs", ".hidden",
                            ".out.npy.0123456789abcdef"])  # fmt: skip
    assert {name: files_of(out)[name] for name in USER_FILES} == USER_FILES


def test_a_folder_held_by_a_running_compile_is_not_swept(tmp_path, net):
    """The next compile clears up only what nobody holds, and only names netdsl makes for this build folder."""
    build = Build(net, "fp32")
    out = build.write(tmp_path / "build")
    running = tmp_path / ".build.netdsl-new.00112233445566aa"
    running.mkdir()
    (running / "plan.json").write_text("{}")
    others = [tmp_path / ".other.netdsl-new.00112233445566aa", tmp_path / ".build.netdsl-new.not-hex"]
    for other in others:
        other.mkdir()
    held = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        build.write(out)
        assert running.exists()
    finally:
        os.close(held)
    build.write(out)
    assert not running.exists() and all(other.exists() for other in others)


def test_two_compiles_into_one_folder_at_once_end_in_one_whole_build(tmp_path, net):
    """Two compiles into one folder at the same time take turns at the swap: one whole build, the user's files
    in it, nothing beside it."""
    fp32, bf16 = Build(net, "fp32"), Build(net, "bf16")
    wholes = []
    for build in (fp32, bf16):
        wholes.append(files_of(build.write(tmp_path / f"alone_{build.options.dtype}" / "build")))
    root = tmp_path / "root"
    out = root / "build"
    fp32.write(out)
    add_user_files(out)
    for _ in range(5):
        barrier, errors = threading.Barrier(2), []

        def compile_(build, barrier=barrier, errors=errors):
            try:
                barrier.wait(timeout=60)
                for _ in range(3):
                    build.write(out)
            except Exception as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=compile_, args=(build,)) for build in (fp32, bf16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors
        files = files_of(out)
        assert {name: files.pop(name) for name in USER_FILES} == USER_FILES
        assert files in wholes
        assert os.listdir(root) == ["build"]


def test_a_linked_build_folder_stays_a_link_and_keeps_its_permissions(tmp_path, net):
    build = Build(net, "fp32")
    real = tmp_path / "real"
    build.write(real)
    real.chmod(0o750)
    link = tmp_path / "link"
    link.symlink_to(real)
    build.write(link)
    assert link.is_symlink() and (real / "plan.json").is_file()
    assert real.stat().st_mode & 0o777 == 0o750
    assert sorted(os.listdir(tmp_path)) == sorted(["link", "real", "tiny.net"])


def test_a_file_where_the_build_folder_goes_is_an_error(tmp_path, net):
    (tmp_path / "build").write_text("not a folder")
    with pytest.raises(NetError, match="it is a file"):
        Build(net, "fp32").write(tmp_path / "build")
    assert (tmp_path / "build").read_text() == "not a folder"
