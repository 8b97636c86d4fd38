"""Automatic restart: under `torchrun --max-restarts`, a rank killed with SIGKILL at a random step
brings the job down and back up; the relaunch resumes from the latest committed checkpoint with
no flag changed, finishes, and its losses equal an uninterrupted run's, each step logged once."""
import os
import random
import signal
import subprocess
import sys
import time

from runtime.metrics import read_metrics
from tests.e2e.test_cli import REPO, TORCHRUN
from tests.training import SMALL, assert_same_losses, train
from launch.spawn import scaled

STEPS = 40
RUN = ["train.steps=40", "checkpoint.every=4", "train.micro_batch_size=2"]


def _steps_logged(run_dir) -> int:
    try:
        return max((r["step"] for r in read_metrics(run_dir)), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def test_a_killed_rank_restarts_the_job_which_resumes_exactly(tmp_path):
    reference = train(tmp_path / "whole", RUN, world_size=4)
    run_dir = tmp_path / "restarted"
    kill_at = random.Random().randint(5, STEPS - 10)
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=4", "--max-restarts=2", "--monitor-interval=0.2",
           "-m", "launch.train", *SMALL, *RUN, f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + scaled(120)
        while _steps_logged(run_dir) < kill_at:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.02)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 4, workers
        victim = random.choice(workers)
        os.kill(int(victim), signal.SIGKILL)
        out, _ = proc.communicate(timeout=scaled(240))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"killed at step ≥ {kill_at}:\n{out[-4000:]}"
    assert "resumed from" in out and "checkpoints/step_" in out, out[-2000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "a step is missing or repeated"
    assert_same_losses(reference, records, rtol=1e-6)
    print(f"killed worker {victim} at step ≥ {kill_at}", file=sys.stderr)
