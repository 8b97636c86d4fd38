"""Two jobs in one run directory: the second stops with a message naming the first, with exit
code 2, and the first job's records stay its own."""
import os
import signal
import subprocess
import sys

from launch.spawn import scaled
from runtime.metrics import read_metrics
from tests.e2e.test_checkpoint_signals import wait_for
from tests.e2e.test_cli import REPO, launch, workers_stopped_with_2
from tests.training import SMALL

STEPS = [o for o in SMALL if not o.startswith("train.steps")]


def test_a_second_job_in_a_busy_run_dir_stops_and_the_first_is_untouched(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "launch.train", *STEPS, "train.steps=100000", f"run_dir={run}"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: len(read_metrics(run)) >= 2, 120, "the first job never trained")
        config = (run / "config.yaml").read_text()
        for nproc in (1, 2):
            code, out, _ = launch([*STEPS, "train.steps=5", "seed=7", f"run_dir={run}"], nproc=nproc, timeout=120)
            assert f"run_dir={run} is in use by another job" in out and f"(pid {first.pid} on host" in out, out
            assert "Traceback" not in out if nproc == 1 else workers_stopped_with_2(out), out
            assert code == 2 if nproc == 1 else code != 0
        assert first.poll() is None, "the first job must go on"
        assert (run / "config.yaml").read_text() == config
        steps = [r["step"] for r in read_metrics(run)]
        assert steps == list(range(1, len(steps) + 1)), "only the first job's steps, each once"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(scaled(30))
    # Its lock died with it: a new launch takes the directory over (and resumes nothing: no checkpoint).
    code, out, _ = launch([*STEPS, "train.steps=3", f"run_dir={run}"])
    assert code == 0 and "took over the lock" in out, out
