"""Cron- and CI-grade runs: --state folding, locking, half-written checkpoints, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ema_cli import job, lock
from tests.conftest import average_status as average
from tests.conftest import load, write_checkpoint

STEPS = (100, 200, 300, 400, 500)


def make(folder: Path, steps: tuple[int, ...] = STEPS, size: int = 300) -> list[Path]:
    rng = np.random.default_rng(11)
    paths = []
    for step in steps:
        paths.append(
            write_checkpoint(
                folder / f"ckpt-{step}.safetensors",
                {
                    "w": rng.standard_normal((size, 7)).astype(np.float32),
                    "h": rng.standard_normal(size).astype(ml_dtypes.bfloat16),
                    "d": rng.standard_normal(5),
                    "step": np.array(step, np.int64),
                },
            )
        )
    return paths


OPTION_SETS = [
    ["--decay", "0.9"],
    ["--decay", "0.99", "--num-updates", "index", "--zero-debias"],
    ["--decay", "0.999", "--num-updates", "step", "--precision", "native"],
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "debias-index", "step-native"])
def test_folding_three_then_two_equals_one_replay(tmp_path: Path, options: list[str]) -> None:
    paths = make(tmp_path / "run")
    full, inc = tmp_path / "full.safetensors", tmp_path / "inc.safetensors"
    assert average(*paths, "-o", full, *options, "-q")[0] == 0

    state = tmp_path / "state"
    code, _, err = average(*paths[:3], "-o", inc, *options, "--state", state, "--settle", "0")
    assert code == 0, err
    code, _, err = average(*paths, "-o", inc, *options, "--state", state, "--settle", "0")
    assert code == 0, err
    assert "2 of them" not in err and "3 of them from the saved state" in err
    assert inc.read_bytes() == full.read_bytes()
    full_map = json.loads((tmp_path / "full.mapping.json").read_text())
    inc_map = json.loads((tmp_path / "inc.mapping.json").read_text())
    for key in ("output", "outputs", "state"):
        full_map.pop(key), inc_map.pop(key)
    assert inc_map == full_map

    # A third run with nothing new changes nothing.
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    code, out, err = average(
        *paths, "-o", inc, *options, "--state", state, "--settle", "0", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["status"] == "up to date"
    assert "up to date" in err
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_state_folder_holds_one_consistent_state(tmp_path: Path) -> None:
    """Earlier shadows and what killed runs left (hidden temporaries) are cleaned up."""
    paths = make(tmp_path / "run")
    state = tmp_path / "state"
    for n in (2, 4, 5):
        if state.is_dir():
            (state / ".state.json.abc123.tmp").write_text("half")
            (state / ".shadows-0123456789abcdef.safetensors.x1.tmp").write_bytes(b"\0")
        assert (
            average(
                *paths[:n],
                "-o",
                tmp_path / "o.safetensors",
                "--decay",
                "0.9",
                "--state",
                state,
                "--settle",
                "0",
            )[0]
            == 0
        )
    files = sorted(p.name for p in state.iterdir())
    assert files[-1] == "state.json" and len(files) == 2 and files[0].startswith("shadows-")
    record = json.loads((state / "state.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == list(STEPS)
    assert not list(tmp_path.glob(".*lock"))


def test_restart_and_changed_settings(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    assert (
        average(*paths[:3], "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")[0] == 0
    )
    before = out.read_bytes()
    code, _, err = average(*paths, "-o", out, "--decay", "0.99", "--state", state, "--settle", "0")
    assert code == 2
    assert err.strip() == (
        f"ema-cli: error: {state}: the state was made with --decay 0.9, this run asks for 0.99; "
        "run with --restart to rebuild the state from scratch"
    )
    assert out.read_bytes() == before
    code, _, err = average(
        *paths, "-o", out, "--decay", "0.99", "--state", state, "--settle", "0", "--restart"
    )
    assert code == 0, err
    full = tmp_path / "full.safetensors"
    assert average(*paths, "-o", full, "--decay", "0.99", "-q")[0] == 0
    assert out.read_bytes() == full.read_bytes()


def test_folded_checkpoint_changed_vanished_or_new_one_older(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    assert (
        average(*paths[1:4], "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")[0] == 0
    )

    code, _, err = average(*paths, "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")
    assert (
        code == 2
        and f"new checkpoint {paths[0]} comes before {paths[3]}" in err
        and "--restart" in err
    )

    code, _, err = average(
        *paths[2:], "-o", out, "--decay", "0.9", "--state", state, "--settle", "0"
    )
    assert (
        code == 2
        and f"checkpoint {paths[1]} was folded in but is no longer among the inputs" in err
    )

    os.utime(paths[2], ns=(1, 1))
    code, _, err = average(
        *paths[1:], "-o", out, "--decay", "0.9", "--state", state, "--settle", "0"
    )
    assert code == 2 and f"checkpoint {paths[2]} changed since it was folded in" in err


def test_a_checkpoint_rewritten_during_a_run_is_noticed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state records each checkpoint as it was before it was read: one rewritten while
    the replay runs (here: its mtime moves) is reported by the next run, not trusted."""
    paths = make(tmp_path / "run")
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    original = job.replay_averages

    def replay_then_touch(*args, **kwargs):  # type: ignore[no-untyped-def]
        yield from original(*args, **kwargs)
        os.utime(paths[2], ns=(0, os.stat(paths[2]).st_mtime_ns + 5_000_000_000))

    monkeypatch.setattr(job, "replay_averages", replay_then_touch)
    assert (
        average(*paths[:3], "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")[0] == 0
    )
    monkeypatch.setattr(job, "replay_averages", original)
    code, _, err = average(*paths, "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")
    assert code == 2 and "changed since it was folded in" in err, err


def test_hash_with_state_reads_only_the_new_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--hash digests of checkpoints folded in earlier come from the state, not a re-read."""
    paths = make(tmp_path / "run")
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    options = ["--decay", "0.9", "--state", state, "--settle", "0", "--hash"]
    assert average(*paths[:3], "-o", out, *options)[0] == 0
    first = json.loads((tmp_path / "o.mapping.json").read_text())["checkpoints"]
    hashed: list[str] = []
    original = job.report.sha256

    def counting(path: Path):  # type: ignore[no-untyped-def]
        hashed.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(job.report, "sha256", counting)
    assert average(*paths, "-o", out, *options)[0] == 0
    assert sorted(hashed) == sorted([paths[3].name, paths[4].name, out.name])
    second = json.loads((tmp_path / "o.mapping.json").read_text())["checkpoints"]
    assert [c["sha256"] for c in second[:3]] == [c["sha256"] for c in first]
    assert second[3]["sha256"] == original(paths[3])


def test_missing_output_is_rebuilt_from_all_checkpoints(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    assert (
        average(*paths[:3], "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")[0] == 0
    )
    out.unlink()
    code, _, err = average(*paths, "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")
    assert code == 0 and "is missing; rebuilding" in err
    full = tmp_path / "full.safetensors"
    assert average(*paths, "-o", full, "--decay", "0.9", "-q")[0] == 0
    assert out.read_bytes() == full.read_bytes()


def test_half_written_newest_is_skipped_then_folded(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    complete = paths[-1].read_bytes()
    paths[-1].write_bytes(complete[: len(complete) // 2])  # still being written
    code, _, err = average(*paths, "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")
    assert code == 0, err
    assert f"warning: skipping {paths[-1]}: truncated" in err
    assert len(json.loads((state / "state.json").read_text())["checkpoints"]) == 4

    paths[-1].write_bytes(complete)  # finished
    code, _, err = average(*paths, "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")
    assert code == 0, err
    full = tmp_path / "full.safetensors"
    assert average(*paths, "-o", full, "--decay", "0.9", "-q")[0] == 0
    assert out.read_bytes() == full.read_bytes()


def test_recently_modified_newest_waits_for_settle(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    old = time.time() - 3600
    for p in paths[:-1]:
        os.utime(p, (old, old))
    code, _, err = average(*paths, "-o", out, "--decay", "0.9", "--state", state)
    assert code == 0, err
    assert f"skipping {paths[-1]}: modified less than 60s ago" in err
    assert len(json.loads((state / "state.json").read_text())["checkpoints"]) == 4
    code, _, err = average(*paths, "-o", out, "--decay", "0.9", "--state", state, "--settle", "0")
    assert code == 0 and len(json.loads((state / "state.json").read_text())["checkpoints"]) == 5


def test_truncated_older_checkpoint_is_an_error(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-7])
    code, _, err = average(
        *paths,
        "-o",
        tmp_path / "o.safetensors",
        "--decay",
        "0.9",
        "--state",
        tmp_path / "s",
        "--settle",
        "0",
    )
    assert code == 2 and str(paths[1]) in err and "truncated" in err
    assert (
        not (tmp_path / "o.safetensors").exists() and not (tmp_path / "s" / "state.json").exists()
    )


def test_without_state_a_truncated_newest_is_an_error(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    paths[-1].write_bytes(paths[-1].read_bytes()[:100])
    code, _, err = average(*paths, "-o", tmp_path / "o.safetensors", "--decay", "0.9")
    assert code == 2 and "truncated" in err


def test_a_concurrent_run_exits_75(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    with lock.exclusive(out, "output"):
        code, _, err = average(*paths, "-o", out, "--decay", "0.9")
        assert code == 75
        assert (
            err
            == f"ema-cli: error: {out}: the output is locked by another ema-cli run (pid {os.getpid()}); try again later\n"
        )
    with lock.exclusive(state, "state"):
        code, _, err = average(*paths, "-o", out, "--decay", "0.9", "--state", state)
        assert code == 75 and "the state is locked" in err
    assert not out.exists()
    assert average(*paths, "-o", out, "--decay", "0.9", "-q")[0] == 0  # released


def test_runs_sharing_any_target_exclude_each_other(tmp_path: Path) -> None:
    """A run locks every file it writes, not only its output: -o out/ema.safetensors and
    -o out/ema (a folder) share out/ema.mapping.json, and one run's trajectory file can be
    another's output. The second run exits 75 and leaves the first one's live temporaries (and
    everything else) alone."""
    paths = make(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    live = out / ".ema.mapping.json.0123abcd.tmp"  # what the other run is writing
    live.write_text("{}")
    with lock.exclusive(out / "ema.mapping.json", "mapping file"):
        code, _, err = average(*paths, "-o", out / "ema", "--decay", "0.9")
    assert code == 75 and f"{out / 'ema.mapping.json'}: the mapping file is locked" in err, err
    assert sorted(p.name for p in out.iterdir()) == [live.name]
    live.unlink()
    trajectory = out / f"ema.{paths[0].name}"
    (out / "ema.safetensors").write_bytes(b"before")
    with lock.exclusive(trajectory, "output"):
        code, _, err = average(
            *paths, "-o", out / "ema.safetensors", "--decay", "0.9", "--every", "1"
        )
    assert code == 75 and f"{trajectory}: the trajectory file is locked" in err, err
    assert (out / "ema.safetensors").read_bytes() == b"before"
    assert sorted(p.name for p in out.iterdir()) == ["ema.safetensors"]


def test_stale_lock_file_from_a_killed_run_does_not_block(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    out = tmp_path / "o.safetensors"
    lock.lock_path(out).write_text("999999\n")  # left by a run killed with SIGKILL
    assert average(*paths, "-o", out, "--decay", "0.9", "-q")[0] == 0
    assert not lock.lock_path(out).exists()


def test_last_cannot_go_with_state(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    code, _, err = average(
        *paths,
        "-o",
        tmp_path / "o.safetensors",
        "--decay",
        "0.9",
        "--state",
        tmp_path / "s",
        "--last",
        "2",
    )
    assert code == 2 and "--last cannot be combined with --state" in err
    code, _, err = average(*paths, "-o", tmp_path / "o.safetensors", "--decay", "0.9", "--restart")
    assert code == 2 and "--restart goes with --state" in err


KILL_SCRIPT = """
import sys
from ema_cli.cli import cli
cli.main(sys.argv[1:])
"""


def test_sigkill_at_any_moment_leaves_previous_outputs_and_state_usable(tmp_path: Path) -> None:
    """Kill real runs at several points; every time the output and state on disk are complete
    (the previous ones or the new ones) and the next run produces the full-replay bytes."""
    paths = make(tmp_path / "run", steps=tuple(range(10, 130, 10)), size=40_000)  # 12 x ~1.3 MB
    full = tmp_path / "full.safetensors"
    assert average(*paths, "-o", full, "--decay", "0.99", "-q")[0] == 0
    reference = full.read_bytes()
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    command = [
        sys.executable,
        "-c",
        KILL_SCRIPT,
        "average",
        "-o",
        str(out),
        "--decay",
        "0.99",
        "--state",
        str(state),
        "--settle",
        "0",
        "-q",
    ]
    # A first complete run over half the checkpoints: the "previous" output and state.
    subprocess.run([*command, *map(str, paths[:6])], check=True)
    previous = out.read_bytes()
    seen_outcomes = set()
    kills_landed = 0
    for delay in (0.0, 0.1, 0.2, 0.3, 0.5):
        proc = subprocess.Popen([*command, *map(str, paths)], stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills_landed += proc.returncode == -signal.SIGKILL  # not when the run had finished
        current = out.read_bytes()
        assert current in (previous, reference), delay
        seen_outcomes.add(current == reference)
        assert load(out)["w"].shape == (40_000, 7)
        recorded = json.loads((state / "state.json").read_text())
        assert len(recorded["checkpoints"]) in (6, 12)
        assert (state / recorded["shadows"]).is_file()
        # The next run (not killed) always ends with the full-replay bytes.
        finish = subprocess.run([*command, *map(str, paths)], capture_output=True, text=True)
        assert finish.returncode == 0, finish.stderr
        assert out.read_bytes() == reference
        # Back to the "previous" state for the next kill.
        subprocess.run([*command, "--restart", *map(str, paths[:6])], check=True)
        assert out.read_bytes() == previous
    assert kills_landed >= 1
    assert False in seen_outcomes  # some kill left the previous output, not just finished runs
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".o.") and p.name.endswith(".tmp")
    ]


def test_state_must_be_a_folder(tmp_path: Path) -> None:
    paths = make(tmp_path / "run")
    (tmp_path / "state").write_text("not a folder")
    code, _, err = average(
        *paths, "-o", tmp_path / "o.safetensors", "--decay", "0.9", "--state", tmp_path / "state"
    )
    assert code == 2 and "is a file" in err and "--state" in err


def test_a_failed_first_state_run_leaves_no_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ema_cli.formats import safetensors as st

    paths = make(tmp_path / "run")
    real_read = st.SafetensorsReader.read

    def failing(self, name, start=0, stop=None, out=None):  # type: ignore[no-untyped-def]
        if self.path == paths[2] and name == "w":
            raise st.TruncatedCheckpointError(
                self.path, "truncated: the file ended while reading this tensor", tensor=name
            )
        return real_read(self, name, start, stop, out)

    monkeypatch.setattr(st.SafetensorsReader, "read", failing)
    code, _, err = average(
        *paths,
        "-o",
        tmp_path / "o.safetensors",
        "--decay",
        "0.9",
        "--state",
        tmp_path / "state",
        "--settle",
        "0",
    )
    assert code == 2 and "truncated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "debias-index", "step-native"])
def test_a_rotating_folder_folds_like_one_replay(tmp_path: Path, options: list[str]) -> None:
    """CheckpointManager(max_to_keep=N) and Trainer's save_total_limit delete old checkpoints:
    folding 3, deleting the oldest 2, then folding the next 3 gives the bytes of one 6-checkpoint
    replay, and the mapping keeps the deleted ones' records, marked gone."""
    steps = (100, 200, 300, 400, 500, 600)
    paths = make(tmp_path / "run", steps)
    full, inc = tmp_path / "full.safetensors", tmp_path / "inc.safetensors"
    assert average(*paths, "-o", full, *options, "-q")[0] == 0
    state = tmp_path / "state"
    fold = ["-o", inc, *options, "--state", state, "--settle", "0", "-q"]
    assert average(*paths[:3], *fold)[0] == 0
    for old in paths[:2]:
        old.unlink()
    code, out, err = average(*paths[2:], *fold, "--json")
    assert code == 0, err
    assert inc.read_bytes() == full.read_bytes()
    record = json.loads(out)
    assert [c["path"] for c in record["checkpoints"]] == [str(p) for p in paths]
    assert [bool(c.get("gone")) for c in record["checkpoints"]] == [True, True] + [False] * 4
    assert average(*paths[2:], *fold)[0] == 0  # and then it is up to date


def test_a_rotated_folder_still_refuses_what_would_be_wrong(tmp_path: Path) -> None:
    paths = make(tmp_path / "run", (100, 200, 300, 400))
    out, state = tmp_path / "o.safetensors", tmp_path / "state"
    fold = ["-o", out, "--decay", "0.9", "--state", state, "--settle", "0"]
    assert average(*paths[:3], *fold)[0] == 0
    # Still on disk but not given: an error, not a silent drop.
    code, _, err = average(*paths[1:], *fold)
    assert code == 2 and "no longer among the inputs" in err, err
    paths[0].unlink()
    # A new checkpoint must come after the last one folded in, even when older ones are gone.
    late = make(tmp_path / "run", (150,))[0]
    code, _, err = average(late, *paths[1:], *fold)
    assert code == 2 and f"new checkpoint {late} comes before" in err, err
    late.unlink()
    # A folded-in checkpoint that changed is still refused.
    os.utime(paths[2], ns=(0, os.stat(paths[2]).st_mtime_ns + 5_000_000_000))
    code, _, err = average(*paths[1:], *fold)
    assert code == 2 and "changed since it was folded in" in err, err


@pytest.mark.parametrize(
    "options",
    [["--decay", "0.9", "--num-updates", "step"], ["--mean"], ["--decay-per-step", "0.99"]],
    ids=["decay", "mean", "per-step"],
)
def test_a_rotating_tensorflow_folder_folds_like_one_replay(
    tmp_path: Path, options: list[str]
) -> None:
    """The same for TensorBundle checkpoints given as prefixes (what CheckpointManager's
    max_to_keep rotates), with TF's and the incremental profiles."""
    steps = (100, 200, 300, 400, 500, 600)
    sources = make(tmp_path / "src", steps)
    run = tmp_path / "run"
    run.mkdir()
    prefixes = []
    for step, source in zip(steps, sources, strict=True):  # written by ema-cli's own writer
        assert average(source, "-o", run / f"ckpt-{step}.index", "--mean", "-q")[0] == 0
        (run / f"ckpt-{step}.mapping.json").unlink()
        prefixes.append(run / f"ckpt-{step}")
    full, inc = tmp_path / "full.index", tmp_path / "inc.index"
    assert average(*prefixes, "-o", full, *options, "-q")[0] == 0
    fold = ["-o", inc, *options, "--state", tmp_path / "state", "--settle", "0", "-q"]
    assert average(*prefixes[:3], *fold)[0] == 0
    for old in prefixes[:2]:
        for part in run.glob(f"{old.name}.*"):
            part.unlink()
    assert average(*prefixes[2:], *fold)[0] == 0
    for suffix in (".index", ".data-00000-of-00001"):
        assert inc.with_suffix(suffix).read_bytes() == full.with_suffix(suffix).read_bytes()


def test_one_state_folder_keeps_one_outputs_average(tmp_path: Path) -> None:
    """Two outputs sharing a --state folder would each find the other's state, rebuild and
    rewrite it on every run: the second is refused, naming the first, and nothing changes."""
    paths = make(tmp_path / "run")
    state = tmp_path / "state"
    first = ["--decay", "0.9", "--state", state, "--settle", "0"]
    assert average(*paths[:3], "-o", tmp_path / "a.safetensors", *first, "-q")[0] == 0
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    code, _, err = average(*paths, "-o", tmp_path / "b.safetensors", *first)
    assert code == 2, err
    assert f"keeps the average written to {(tmp_path / 'a.safetensors').resolve()}" in err
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    assert not (tmp_path / "b.safetensors").exists()
    # --restart makes the folder b's
    assert average(*paths, "-o", tmp_path / "b.safetensors", *first, "--restart", "-q")[0] == 0
