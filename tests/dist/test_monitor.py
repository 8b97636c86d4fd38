"""The collective monitor (C4): a rank that sleeps before its collectives is named the slow rank
in the first window after the warm-up step; a rank that never arrives at a collective is named in
a hang report within the timeout and the job exits non-zero; a clean run of 50 steps reports
nothing."""
import json
import time

import pytest

from launch.spawn import RankFailure, run_ranks
from runtime.metrics import read_events, read_metrics
from tests.training import SMALL

MONITOR = ["monitor.window=5", "monitor.hang_timeout_s=3", "parallel.timeout_s=30"]


def _run(rank, world, run_dir, fault, overrides):
    """Train 2 ranks; from step 3 on, rank 1 sleeps before each all-reduce (the loss and the
    gradient norm are all-reduced every step) — 0.15 s ("slow") or for good ("hang")."""
    import torch.distributed as dist

    from launch.config import compose
    from launch.train import setup

    r = setup(compose([*SMALL, f"run_dir={run_dir}", *MONITOR, *overrides]))
    trainer, current = r.trainer, {"step": 0}
    train_step = trainer.train_step

    def counted(step):
        current["step"] = step + 1
        return train_step(step)

    trainer.train_step = counted
    if rank == 1 and fault:
        install = trainer.monitor.install

        def install_then_misbehave():  # outside the monitor's wrapper: the arrival itself is late
            install()
            monitored = dist.all_reduce

            def late(*args, **kwargs):
                if current["step"] >= 3:
                    time.sleep(0.15 if fault == "slow" else 3600)
                return monitored(*args, **kwargs)
            dist.all_reduce = late
        trainer.monitor.install = install_then_misbehave
    trainer.fit(0)


def test_a_rank_arriving_late_is_named_the_slow_rank(tmp_path):
    run_ranks(_run, 2, args=(str(tmp_path), "slow", []), timeout_s=120)
    named = [(r["step"], r.get("slow_ranks")) for r in read_metrics(tmp_path) if r.get("slow_ranks")]
    # Windows start after the warm-up step 1: the first verdict covers steps 2-6.
    assert named and named[0][0] == 6 and all(ranks == [1] for _, ranks in named), named
    events = [json.loads(line) for line in (tmp_path / "diagnosis.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "slow_ranks" and events[0]["ranks"] == [1]


def test_a_rank_that_never_arrives_is_named_and_the_job_exits(tmp_path):
    # Exit code 3 and the monitor's diagnosis, not the backend's timeout (parallel.timeout_s=30).
    with pytest.raises(RankFailure, match="exited with code 3"):
        run_ranks(_run, 2, args=(str(tmp_path), "hang", []), timeout_s=60)
    events = [json.loads(line) for line in (tmp_path / "diagnosis.jsonl").read_text().splitlines()]
    hang = [e for e in events if e["event"] == "hang"]
    assert hang and hang[0]["rank"] == 0 and hang[0]["missing"] == [1] and hang[0]["op"] == "all_reduce", events
    assert hang[0]["waited_s"] >= 3
    assert read_events(tmp_path, "hang") == hang  # rank 0's report is in metrics.jsonl too
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_clean_run_reports_nothing(tmp_path):
    run_ranks(_run, 2, args=(str(tmp_path), None, ["train.steps=50"]), timeout_s=120)
    records = read_metrics(tmp_path)
    assert len(records) == 50 and not any("slow_ranks" in r for r in records)
    assert not (tmp_path / "diagnosis.jsonl").exists()
