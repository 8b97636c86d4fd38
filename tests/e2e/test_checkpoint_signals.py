"""Checkpoints under signals: SIGTERM (preemption) ends a torchrun job with a final checkpoint it
resumes from, no step missing or repeated, also without periodic checkpoints; SIGKILL during a write leaves the previous checkpoint
as `latest`, and it loads."""
import os
import signal
import subprocess
import sys
import time

from runtime.metrics import read_metrics
from tests.e2e.test_cli import REPO, TORCHRUN, launch
from tests.training import SMALL
from launch.spawn import scaled

STEPS = [o for o in SMALL if not o.startswith("train.steps")]


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_sigterm_saves_a_final_checkpoint_and_the_job_resumes_from_it(tmp_path):
    run = tmp_path / "run"
    args = [*STEPS, "train.steps=150", f"run_dir={run}"]  # checkpoint.every=0: only the signal saves
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "launch.train", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 10, 120, "no training")
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to its workers, as Slurm's srun does
        out, _ = proc.communicate(timeout=scaled(60))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done = [m["step"] for m in read_metrics(run)]
    assert "stopping after step" in out, out[-3000:]
    assert done == list(range(1, len(done) + 1)) and len(done) < 150
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{done[-1]:08d}"
    code, out, _ = launch(args, nproc=2)
    assert code == 0, out[-3000:]
    assert f"step_{done[-1]:08d} at step {done[-1]}" in out, out[-3000:]
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 151))


KILLED_WRITER = """
import sys, time
from launch.config import compose
from launch.train import setup
from runtime.checkpoint.lazy import LazyCheckpointer

class SlowStorage(LazyCheckpointer):
    def _write_region(self, *region):
        if self.slow:
            time.sleep(0.5)  # long enough for the parent to kill us mid-write
        super()._write_region(*region)

r = setup(compose(sys.argv[1:]))
engine = SlowStorage(r.cfg.checkpoint.dir, every=0, rank=0, pool_bytes=1 << 16, chunk_bytes=1 << 14)
engine.slow = False
for step in range(4):
    r.trainer.train_step(step)
    if step == 1:
        engine.request(2, r.trainer.state(), {"tokens": 0})
        engine.drain()
engine.slow = True
engine.request(4, r.trainer.state(), {"tokens": 0})
print("writing", flush=True)
engine.drain()
"""


def test_sigkill_during_a_write_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [*STEPS, f"run_dir={run}"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    shard = run / "checkpoints/step_00000004/shard-00000.bin"
    try:
        wait_for(lambda: shard.exists() and shard.stat().st_size > 0 or proc.poll() is not None, 120, "no write")
        assert proc.poll() is None, proc.stdout.read()
        proc.kill()
    finally:
        proc.wait(30)
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000002"
    assert not (run / "checkpoints/step_00000004/trainer.json").exists()
    code, out, _ = launch([*args, "train.steps=6"])
    assert code == 0, out[-3000:]
    assert "at step 2" in out, out[-3000:]
    assert [m["step"] for m in read_metrics(run)][-4:] == [3, 4, 5, 6]
