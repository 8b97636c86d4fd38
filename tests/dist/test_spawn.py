"""The multi-process helper itself: results come back, failures re-raise, hangs end."""
import time

import pytest
import torch
import torch.distributed as dist

from launch.spawn import RankFailure, run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 would wait here forever without the helper's fail-fast


def _hang(rank, world_size):
    time.sleep(60)


def test_results_come_back_in_rank_order():
    assert run_ranks(_sum_ranks, 4) == [6.0] * 4


@pytest.mark.timeout(120)
def test_a_failing_rank_is_reraised_and_the_others_are_stopped():
    # Rank 0 would wait in its barrier for the hour-long group timeout: only the helper's
    # fail-fast ends this test before pytest's own deadline.
    with pytest.raises(RankFailure, match="rank 1 of 2 failed.*:\nValueError: rank one is broken"):
        run_ranks(_fail_on_rank_1, 2, pg_timeout_s=3600, timeout_s=3600)


def test_a_hang_ends_at_the_deadline(monkeypatch):
    monkeypatch.setenv("QUINTET_DEADLINE_FACTOR", "1")
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 3s"):
        run_ranks(_hang, 2, timeout_s=3)


def test_deadlines_scale_with_the_environment_factor(monkeypatch):
    monkeypatch.setenv("QUINTET_DEADLINE_FACTOR", "2")
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 1 did not finish within 2s"):
        run_ranks(_hang, 1, timeout_s=1)
