"""A real single-node Slurm (munge, slurmctld, slurmd from Debian's packages): slurm/train.sbatch
trains, its run directory comes from the job id, a requeued job resumes from its latest
checkpoint, and srun tasks find each other from Slurm's variables alone."""
import shutil
import time
from pathlib import Path

import pytest

from runtime.metrics import read_metrics
from tests.integration.slurm_local import LocalSlurm, ensure_installed
from tests.training import SMALL
from launch.spawn import scaled

REPO = Path(__file__).resolve().parents[2]
REASON = ensure_installed()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as s:
        yield s


def steps(job) -> list[int]:
    return [r["step"] for r in read_metrics(REPO / f"runs/slurm-{job}")]


def test_sbatch_trains_and_a_requeued_job_resumes(slurm):
    overrides = [o for o in SMALL if not o.startswith("train.steps")] + ["train.steps=40", "checkpoint.every=5"]
    job = slurm.sbatch(["--nodes=1", str(REPO / "slurm/train.sbatch"), *overrides], cwd=str(REPO),
                       env={"QUINTET_NPROC_PER_NODE": "2"})
    assert not (REPO / f"runs/slurm-{job}").exists()
    try:
        done = 0
        for _ in range(240):  # let it train a while, then requeue it (a preemption)
            done = len(steps(job))
            if done >= 15:
                break
            time.sleep(0.5)
        assert done >= 15, slurm.output(job)[-3000:]
        slurm.requeue(job)
        slurm.wait(job, timeout=scaled(180))
        out = slurm.output(job)
        assert "(torchrun), 2 ranks" in out and f"run_dir runs/slurm-{job}" in out, out[-3000:]
        assert out.count("resumed from") == 1, out[-3000:]
        assert steps(job) == list(range(1, 41)), "a step is missing or repeated after the requeue"
        assert (REPO / f"runs/slurm-{job}/checkpoints/latest").read_text().strip() == "step_00000040"
    finally:
        shutil.rmtree(REPO / f"runs/slurm-{job}", ignore_errors=True)


def test_srun_tasks_rendezvous_from_slurm_variables(slurm):
    job = slurm.sbatch(["--ntasks=2", "--cpus-per-task=1", "--wrap",
                        f"srun {REPO}/.venv/bin/python -m launch.train {' '.join(SMALL)} train.steps=5"], cwd=str(REPO))
    try:
        slurm.wait(job, timeout=scaled(120))
        out = slurm.output(job)
        assert "(slurm), 2 ranks" in out, out[-3000:]
        assert steps(job) == [1, 2, 3, 4, 5]
    finally:
        shutil.rmtree(REPO / f"runs/slurm-{job}", ignore_errors=True)
