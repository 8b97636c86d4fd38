"""FSSDP: the sparse collectives against their dense definitions, and training against one
process (with replicas, re-materialisation and a re-sharding event), and checkpoints shared
with expert parallelism."""
import random

import pytest
import torch
import torch.distributed as dist

from launch.spawn import run_ranks
from tests.training import SCRATCH_RUN_DIR, assert_same_losses, total_losses, train

ROW = 6  # parameters per expert row


def random_plan(rng: random.Random, devices: int, experts: int, empty_owner: bool):
    owners = [rng.randrange(devices) for _ in range(experts)]
    if empty_owner:  # device 0 owns nothing
        owners = [o if o != 0 else 1 for o in owners]
    holders = []
    for e in range(experts):
        extra = [d for d in range(devices) if d != owners[e] and rng.random() < 0.4]
        holders.append([owners[e], *extra])
    return owners, holders


def _collectives(rank, world, seed):
    from parallel.strategies.fssdp.collectives import (PendingGather, PendingReduceScatter, SparsePlan,
                                            dense_all_gather_then_select, dense_reduce_then_scatter)

    rng = random.Random(seed)
    results = []
    for trial in range(6):
        experts = rng.choice([1, 3, 8, 13])
        owners, holders = random_plan(rng, world, experts, empty_owner=trial % 3 == 0 and world > 1)
        if trial == 5:
            holders = [[o] for o in owners]  # nothing moves
        plan = SparsePlan.make(rank, world, owners, holders)
        owned = torch.randn(len(plan.owned()), ROW, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(seed * 100 + trial * 10 + rank))
        gather = PendingGather(owned, plan, None)
        got = gather.wait()
        torch.testing.assert_close(got, dense_all_gather_then_select(owned, plan, None), rtol=0, atol=0)
        held = torch.randn(len(plan.held()), ROW, dtype=torch.float64)
        scatter = PendingReduceScatter(held, plan, None)
        torch.testing.assert_close(scatter.wait(), dense_reduce_then_scatter(held, plan, None), rtol=1e-12, atol=1e-12)
        # Bytes moved = rows of the experts that change place: summed over ranks, one row per replica.
        counts = torch.tensor([gather.sent_rows, scatter.sent_rows])
        dist.all_reduce(counts)
        assert counts.tolist() == [plan.moved_rows(), plan.moved_rows()]
        results.append(plan.moved_rows())
    return results


@pytest.mark.parametrize("world", [2, 4, 8])
def test_sparse_collectives_equal_their_dense_definitions(world):
    moved = run_ranks(_collectives, world, args=(world,))[0]
    assert moved[-1] == 0 and any(m > 0 for m in moved)


MOE = ["model=tiny_moe", "model.moe.expert_ffn_dim=48", "train.micro_batch_size=1", "parallel.moe_backend=fssdp"]
def _placement_changes(rank, world):
    """What FSSDP actually did in 20 steps: replicas gathered, ownership re-planned."""
    from launch.config import compose
    from launch.train import setup

    overrides = ["model=tiny_moe", "model.moe.expert_ffn_dim=48", "train.micro_batch_size=1",
                 "parallel.moe_backend=fssdp", "parallel.ep=4", "parallel.fssdp.reshard_every=5",
                 "parallel.fssdp.hot=3", "parallel.fssdp.budget=2", "model.n_layers=2", "train.seq_len=32",
                 "train.global_batch_size=8", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
                 "model.ffn_dim=96", SCRATCH_RUN_DIR]
    run = setup(compose(overrides))
    from parallel.strategies.fssdp.layer import FSSDPExperts

    layers = [m for m in run.parallel.model.modules() if isinstance(m, FSSDPExperts)]
    initial = [list(x.owners) for x in layers]
    for step in range(20):
        run.trainer.train_step(step)
    # Re-materialisation gathers a layer's experts again in its backward instead of keeping them
    # from forward: at most one layer's are alive at a time.
    remat = setup(compose(overrides + ["parallel.fssdp.rematerialize=true"]))
    for step in range(2):
        remat.trainer.train_step(step)
    return ([x.gathered_rows for x in layers], [x.owners != o for x, o in zip(layers, initial)],
            [x.w1.shape[0] for x in layers], (run.parallel.model.fssdp_memory.peak, remat.parallel.model.fssdp_memory.peak))


def test_fssdp_replicates_reshards_and_rematerialises():
    out = run_ranks(_placement_changes, 4)
    assert sum(sum(rows) for rows, _, _, _ in out) > 0, "no expert was ever replicated"
    assert all(any(changed) for _, changed, _, _ in out), "ownership never changed"
    owned = [sum(n[i] for _, _, n, _ in out) for i in range(2)]
    assert owned == [8, 8]  # every expert still owned exactly once
    for _, _, _, (kept, rematerialised) in out:
        assert 0 < rematerialised <= 0.6 * kept, (kept, rematerialised)


def test_fssdp_checkpoints_load_into_expert_parallelism_and_back(tmp_path):
    """Expert ownership is a layout, not a format: FSSDP (owned rows) ↔ EP (contiguous slices)."""
    ckpt = ["checkpoint.every=5"]
    moe = MOE[:3]
    whole = train(tmp_path / "whole", ckpt + moe)
    # FSSDP (with a re-sharding before the save) saves; EP resumes.
    train(tmp_path / "a", ckpt + MOE + ["parallel.ep=4", "parallel.fssdp.reshard_every=3", "train.stop_at_step=10"],
          world_size=4)
    ep = train(tmp_path / "a", ckpt + moe + ["parallel.ep=2"], world_size=4)
    assert_same_losses(total_losses(whole), total_losses(ep), rtol=1e-5)
    # EP saves; FSSDP resumes.
    train(tmp_path / "b", ckpt + moe + ["parallel.ep=4", "train.stop_at_step=10"], world_size=4)
    fssdp = train(tmp_path / "b", ckpt + MOE + ["parallel.ep=4"], world_size=4)
    assert_same_losses(total_losses(whole), total_losses(fssdp), rtol=1e-5)
