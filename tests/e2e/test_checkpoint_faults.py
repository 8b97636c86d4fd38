"""Checkpoint faults through the real command line: a full disk stops the run with the directory
named (exit 4), removes the partial checkpoint and keeps the previous one, which the next launch
resumes from; a corrupt checkpoint stops every torchrun worker with exit code 2 and one message
naming the file (checkpoint.fallback=false), or is skipped (the default)."""
import os
import shutil
import subprocess
import uuid

import pytest

from runtime.metrics import read_events, read_metrics
from tests.e2e.test_cli import launch, workers_stopped_with_2
from tests.training import SMALL

STEPS = [o for o in SMALL if not o.startswith("train.steps")]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: one checkpoint of the small model (1.2 MB) fits, a second does not."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root")
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, small_disk):
    args = [*STEPS, "train.steps=8", "checkpoint.every=2", f"checkpoint.dir={small_disk}", f"run_dir={tmp_path}/run"]
    code, out, _ = launch(args)
    assert code == 4, out
    assert (f"could not write the checkpoint of step 4 into {small_disk}/step_00000004: rank 0: [Errno 28] No space "
            "left on device") in out, out
    assert "Traceback" not in out
    assert (small_disk / "latest").read_text().strip() == "step_00000002"
    assert not (small_disk / "step_00000004").exists()
    # With room again, the next launch resumes from the checkpoint the full disk left.
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
    code, out, _ = launch(args)
    assert code == 0 and "at step 2" in out, out
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, 9))


def test_a_corrupt_checkpoint_stops_every_torchrun_worker_or_is_skipped(tmp_path):
    run = tmp_path / "run"
    code, out, _ = launch([*STEPS, "train.steps=8", "checkpoint.every=4", f"run_dir={run}"])
    assert code == 0, out
    shard = run / "checkpoints/step_00000008/shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    resume = [*STEPS, "train.steps=12", "checkpoint.every=4", f"run_dir={run}"]
    code, out, _ = launch([*resume, "checkpoint.fallback=false"], nproc=2)
    assert workers_stopped_with_2(out) and f"quintet: cannot resume: {shard}: block of" in out, out
    assert out.count("Traceback") == 1 and "ChildFailedError" in out, out  # torchrun's own, no worker's
    code, out, _ = launch(resume, nproc=2)
    assert code == 0 and "checkpoint step_00000008 skipped" in out and "at step 4" in out, out
    assert read_events(run, "resume")[-1]["skipped"][0]["checkpoint"] == "step_00000008"
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 13))
