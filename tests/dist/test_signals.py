"""SIGTERM and SIGINT stop a run after the step in progress, on every rank, with a final
checkpoint whatever checkpoint.every says (none with checkpoint.enabled=false); the same signal
twice ends the process at once."""
import os
import signal

import pytest

from launch.spawn import RankFailure, run_ranks
from runtime.metrics import read_metrics
from tests.training import SMALL


def _signalled(rank, world, run_dir, signum, at_step, times, overrides):
    from launch.config import compose
    from launch.train import setup

    r = setup(compose([*SMALL, f"run_dir={run_dir}", *overrides]))
    step = r.trainer.train_step

    def train_step(s):
        metrics = step(s)
        if s + 1 == at_step and rank == world - 1:  # one rank hears it, as when signals arrive a step apart
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return metrics

    r.trainer.train_step = train_step
    r.trainer.fit(r.start_step)
    r.metrics.close()
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").exists() else []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_rank_after_its_step_with_a_final_checkpoint(tmp_path, signum):
    saved = run_ranks(_signalled, 2, args=(tmp_path, signum, 4, 1, []))  # checkpoint.every=0: the default
    assert saved == [["step_00000004"]] * 2
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000004"
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_with_checkpoints_disabled_a_signal_stops_the_run_cleanly(tmp_path):
    saved = run_ranks(_signalled, 2, args=(tmp_path, signal.SIGTERM, 3, 1, ["checkpoint.enabled=false"]))
    assert saved == [[], []] and not (tmp_path / "checkpoints/latest").exists()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


def test_the_same_signal_twice_ends_the_process_at_once(tmp_path):
    with pytest.raises(RankFailure, match=f"exited with code -{int(signal.SIGTERM)} without reporting"):
        run_ranks(_signalled, 1, args=(tmp_path, signal.SIGTERM, 2, 2, []))
