"""Pipeline parallelism against one process: every schedule, interleaving, uneven splits, and
composition with TP, SP, FSDP and DDP; deferred weight gradients. The trace: tests/dist/test_report.py."""
import torch

from launch.spawn import run_ranks
from tests.training import SCRATCH_RUN_DIR, SMALL, assert_same_losses, train

L4 = ["model.n_layers=4"]
MB2 = ["train.micro_batch_size=2"]  # 4 microbatches per data-parallel rank
INTERLEAVED = ["parallel.vpp=2", "parallel.schedule=interleaved_1f1b"]

def _zero_bubble_defers(rank, world):
    from launch.config import compose
    from launch.train import setup

    run = setup(compose([*SMALL, *MB2, "parallel.pp=2", "parallel.schedule=zero_bubble", SCRATCH_RUN_DIR]))
    par = run.parallel
    store = par.chunks[0].weight_grads
    seen = []
    original = store.run

    def run_w(key):
        # At each W, the weights of the linears still lack this microbatch's contribution.
        seen.append(len(store.pending[key]))
        original(key)

    store.run = run_w
    par.pipeline.forward_backward(run.trainer.loader.step(0), 1.0, lambda: torch.autocast("cpu", enabled=False))
    assert len(store) == 0, "weight gradients left pending"
    linears_per_chunk = sum(isinstance(m, torch.nn.Linear) for m in par.chunks[0].modules())
    return seen, linears_per_chunk


def test_zero_bubble_defers_every_linear_weight_gradient_to_its_w():
    for seen, linears in run_ranks(_zero_bubble_defers, 2):
        assert seen == [linears] * 4  # 4 microbatches, each W runs every linear of the chunk


def test_pipeline_checkpoints_resume_and_reshard(tmp_path):
    ckpt = ["checkpoint.every=5"]
    layout = L4 + MB2 + ["parallel.pp=2", *INTERLEAVED]
    whole = train(tmp_path / "whole", ckpt + layout, world_size=2)
    train(tmp_path / "split", ckpt + layout + ["train.stop_at_step=10"], world_size=2)
    assert [r["loss"] for r in train(tmp_path / "split", ckpt + layout, world_size=2)] == [r["loss"] for r in whole]
    # Saved with 4 stages over 2 ranks, resumed with pp=4 (one stage each) and with tp=2.
    for name, world, other in [("pp4", 4, L4 + MB2 + ["parallel.pp=4"]), ("tp2", 2, L4 + MB2 + ["parallel.tp=2"])]:
        train(tmp_path / name, ckpt + layout + ["train.stop_at_step=10"], world_size=2)
        moved = train(tmp_path / name, ckpt + other, world_size=world)
        assert_same_losses(whole, moved, rtol=1e-5)
