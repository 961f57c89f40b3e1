"""Faults from outside the checkpoints' bytes: fifos, devices and endless inputs, read-only and
full disks (a small tmpfs, where the test may mount one), signals at start-up.

Each case runs ``python -m ema_cli`` in a subprocess with a timeout, since what is tested is
the process's whole behaviour: exit status, every byte on stderr, what is left on disk.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import snapshot, write_checkpoint

#: Only to catch hangs: a healthy run here takes well under a second.
TIMEOUT = 60
ELEMENTS = 1 << 16  # 256 KiB of float32 per tensor


def ema_cli(
    args: Sequence[object],
    stdin: object = subprocess.DEVNULL,
    memory: int | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = {k: v for k, v in os.environ.items() if k != "EMA_CLI_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "ema_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=stdin,  # type: ignore[arg-type]
        env=env,
        preexec_fn=limit if memory is not None else None,
        check=False,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ema-cli: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def hidden(folder: Path) -> list[str]:
    """Temporaries, journals and locks a run leaves beside its outputs (hidden names)."""
    return sorted(p.name for p in folder.rglob(".*"))


def run_of(folder: Path, suffix: str) -> list[Path]:
    """Three small checkpoints of one format, each tensor ELEMENTS float32."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in (1, 2, 3):
        rng = np.random.default_rng(step)
        kernel = rng.standard_normal(ELEMENTS).astype(np.float32)
        bias = rng.standard_normal(8).astype(np.float32)
        path = folder / f"ckpt-{step}{suffix}"
        if suffix == ".safetensors":
            write_checkpoint(path, {"dense/kernel": kernel, "dense/bias": bias})
        elif suffix == ".npz":
            np.savez(path, kernel=kernel, bias=bias)
        elif suffix == ".weights.h5":
            with h5py.File(path, "w") as f:
                group = f.create_group("layers/dense/vars")
                group.create_dataset("0", data=kernel)
                group.create_dataset("1", data=bias)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- inputs that are not files


def make_special(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()


INPUT_SUFFIXES = [".safetensors", ".npz", ".weights.h5", ".h5", ".keras", ".pt"]


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("suffix", INPUT_SUFFIXES)
def test_a_checkpoint_that_is_not_a_regular_file_is_one_line(
    tmp_path: Path, kind: str, suffix: str
) -> None:
    good = run_of(tmp_path / "run", ".safetensors")[0]
    special = tmp_path / "run" / f"ckpt-9{suffix}"
    make_special(kind, special)
    out = tmp_path / "out"
    out.mkdir()
    args = ["average", good, special, "-o", out / "ema.safetensors", "--decay", "0.9"]
    proc = ema_cli(args, timeout=8)  # an answer is instant; a hang is the bug
    expected = "fifo (named pipe)" if kind == "fifo" else "character device"
    assert_one_line(proc, str(special), expected)
    assert snapshot(out) == {}


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_tensorflow_index_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    """The TensorBundle reader opens through base.open_for_reading, which checks the type
    first: a fifo ``.index`` does not block."""
    special = tmp_path / "ckpt-9.index"
    make_special(kind, special)
    (tmp_path / "ckpt-9.data-00000-of-00001").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "ema_cli", "inspect", str(special)],
        capture_output=True,
        text=True,
        timeout=8,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_a_directory_named_like_a_file_is_one_line(tmp_path: Path) -> None:
    good = run_of(tmp_path / "run", ".safetensors")[0]
    folder = tmp_path / "run" / "ckpt-9.safetensors"
    folder.mkdir()
    proc = ema_cli(["average", good, folder, "-o", tmp_path / "o.safetensors", "--decay", "0.9"])
    assert_one_line(proc, str(folder))


def test_endless_standard_input_is_bounded(tmp_path: Path) -> None:
    """``-`` with /dev/zero as standard input: one endless line of NUL bytes."""
    with open("/dev/zero", "rb") as zero:
        proc = ema_cli(
            ["average", "-", "-o", tmp_path / "o.safetensors", "--decay", "0.9"],
            stdin=zero,
            memory=2 << 30,
        )
    assert_one_line(proc, "standard input line 1")
    assert hidden(tmp_path) == []


def test_standard_input_that_is_not_a_list_of_paths_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import assert_fails, run_cli

    result = run_cli(["average", "-", "-o", tmp_path / "o.safetensors", "--decay", "0.9"],
                     stdin="run/ckpt-1.safetensors\nrun/ckpt\x002.safetensors\n")  # fmt: skip
    assert_fails(result, "standard input line 2", "NUL")


# ---------------------------------------------------------------- disks that cannot take it


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs mounted at ``folder`` (the test is skipped where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Fill a tmpfs to its last byte."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


@pytest.mark.parametrize("suffix", [".safetensors", ".weights.h5", ".npz"])
@pytest.mark.parametrize("room_kib", [0, 16, 128, 300])
def test_an_output_on_a_full_disk_is_one_line_and_leaves_the_earlier_one(
    tmp_path: Path, suffix: str, room_kib: int
) -> None:
    inputs = run_of(tmp_path / "run", suffix)
    with tmpfs(tmp_path / "disk", f"{room_kib + 64}k") as disk:
        out = disk / f"ema{suffix}"
        out.write_bytes(b"the earlier output")
        mapping = disk / "ema.mapping.json"
        mapping.write_text('{"earlier": true}\n')
        if room_kib == 0:
            fill(disk)
        else:  # leave about room_kib free
            (disk / "filler").write_bytes(b"\0" * (60 << 10))
        before = snapshot(disk)
        proc = ema_cli(["average", *inputs, "-o", out, "--decay", "0.9", "-q"])
        if proc.returncode == 0:  # it fitted: then it must be complete and tidy
            assert hidden(disk) == [], proc.stderr
            assert out.read_bytes() != b"the earlier output"
            return
        assert_one_line(proc, "No space left on device")
        assert "time =" not in proc.stderr  # HDF5's own message, with a clock and an address
        assert snapshot(disk) == before
        assert hidden(disk) == []


@pytest.mark.parametrize("output", ["ema.index", "ema.pt", "ema.keras", "ema"])
@pytest.mark.parametrize("room_kib", [0, 16, 128, 300, 600])
def test_other_outputs_on_a_full_disk_are_one_line_and_leave_the_earlier_one(
    tmp_path: Path, output: str, room_kib: int
) -> None:
    """TensorBundle (two files), torch, .keras (an archive) and a sharded folder output (shards
    and an index, published together) on a disk that cannot take them."""
    if output == "ema.keras":  # a .keras output needs a .keras template
        from tests import fuzz

        run = fuzz.Seeds(tmp_path / "seeds").run(fuzz.FAMILIES["keras"])
        inputs = sorted(run.glob("*.keras"))
    else:
        inputs = run_of(tmp_path / "run", ".safetensors")
    extra = ["--max-shard-size", "300KB"] if output == "ema" else []
    with tmpfs(tmp_path / "disk", f"{room_kib + 64}k") as disk:
        out = disk / output
        earlier = disk / "earlier"  # an earlier run's output, under another name
        earlier.write_bytes(b"the earlier output")
        if room_kib == 0:
            fill(disk)
        else:
            (disk / "filler").write_bytes(b"\0" * (60 << 10))
        before = snapshot(disk)
        proc = ema_cli(["average", *inputs, "-o", out, "--decay", "0.9", "-q", *extra])
        if proc.returncode == 0:
            assert hidden(disk) == [], proc.stderr
            return
        assert_one_line(proc, "No space left on device")
        assert snapshot(disk) == before
        assert hidden(disk) == []


def test_the_mapping_on_a_full_disk_leaves_every_earlier_output(tmp_path: Path) -> None:
    inputs = run_of(tmp_path / "run", ".safetensors")
    out = tmp_path / "out" / "ema.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"the earlier output")
    with tmpfs(tmp_path / "disk", "64k") as disk:
        mapping = disk / "ema.mapping.json"
        mapping.write_text('{"earlier": true}\n')
        fill(disk)
        before_disk, before_out = snapshot(disk), snapshot(out.parent)
        proc = ema_cli(
            ["average", *inputs, "-o", out, "--mapping", mapping, "--decay", "0.9", "-q"]
        )
        assert_one_line(proc, str(mapping))
        assert snapshot(disk) == before_disk
        assert snapshot(out.parent) == before_out
        assert hidden(disk) == [] and hidden(out.parent) == []


def test_state_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    inputs = run_of(tmp_path / "run", ".safetensors")
    out = tmp_path / "out" / "ema.safetensors"
    out.parent.mkdir()
    with tmpfs(tmp_path / "disk", "64k") as disk:
        state = disk / "state"
        fill(disk)
        proc = ema_cli(
            ["average", *inputs, "-o", out, "--state", state, "--settle", "0", "--decay", "0.9"]
        )
        assert_one_line(proc)
        assert hidden(disk) == [] and hidden(out.parent) == []
        assert not out.exists()


@pytest.mark.parametrize("room_kib", [300, 700, 1000, 1300, 1600, 2000, 2600])
def test_a_state_run_on_a_nearly_full_disk_replaces_all_or_nothing(
    tmp_path: Path, room_kib: int
) -> None:
    """The output, the mapping and the state share one disk with little room: either the run
    fits and everything is new, or it fails in one line before any of them is replaced (the
    mapping and state.json have their space reserved before the replay; they were written
    after the output had been renamed into place)."""
    inputs = run_of(tmp_path / "run", ".safetensors")
    with tmpfs(tmp_path / "disk", f"{room_kib + 64}k") as disk:
        out, state = disk / "ema.safetensors", disk / "state"
        common = ["-o", out, "--state", state, "--settle", "0", "--decay", "0.9", "-q"]
        first = ema_cli(["average", *inputs[:2], *common])
        if first.returncode != 0:
            assert_one_line(first, "No space left on device")
            assert snapshot(disk) == {} and hidden(disk) == []
            return
        (disk / "filler").write_bytes(b"\0" * (60 << 10))
        before = snapshot(disk)
        proc = ema_cli(["average", *inputs, *common])
        if proc.returncode == 0:
            assert hidden(disk) == [] and hidden(state) == []
            assert out.read_bytes() != before["ema.safetensors"]
            return
        assert_one_line(proc, "No space left on device")
        assert snapshot(disk) == before
        assert hidden(disk) == [] and hidden(state) == []


def test_a_read_only_output_folder_is_one_line(tmp_path: Path) -> None:
    inputs = run_of(tmp_path / "run", ".safetensors")
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as folder:
        proc = ema_cli(["average", *inputs, "-o", folder / "ema.safetensors", "--decay", "0.9"])
        assert_one_line(proc, "Read-only file system")


# ---------------------------------------------------------------- signals at start-up


def _handles(pid: int, signum: int) -> bool:
    """Whether the process has a handler for ``signum`` installed (``SigCgt`` in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.08])
def test_a_signal_during_start_up_is_one_quiet_line(
    tmp_path: Path, signum: int, delay: float
) -> None:
    """From the entry point's first instruction (the moment its SIGTERM handler shows in
    /proc), a signal during the imports ends the run with one line and 128 + signal."""
    inputs = run_of(tmp_path / "run", ".safetensors")
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "EMA_CLI_DEBUG"}
    args = ["average", *map(str, inputs), "-o", str(out / "ema.safetensors"), "--decay", "0.9"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ema_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + TIMEOUT
    while not _handles(proc.pid, signal.SIGTERM) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=TIMEOUT)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")  # a fast machine at the longest delay
    what = "interrupted" if signum == signal.SIGINT else "terminated"
    assert proc.returncode == 128 + signum, err
    assert err == f"ema-cli: {what}; nothing was written\n"
    assert hidden(out) == [] and not (out / "ema.safetensors").exists()


def test_state_equal_to_the_output_is_refused_not_self_locked(tmp_path: Path) -> None:
    """``-o X --state X`` used to lock itself out ("locked by another run (pid <its own>)")."""
    inputs = run_of(tmp_path / "run", ".safetensors")
    for name in ("ema", "ema.safetensors"):
        target = tmp_path / name
        options = ["--state", target, "--settle", "0", "--decay", "0.9"]
        proc = ema_cli(["average", *inputs, "-o", target, *options])
        assert_one_line(proc, str(target))
        assert "locked" not in proc.stderr
        assert not target.exists() and hidden(tmp_path) == []
