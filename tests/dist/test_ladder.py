"""Ladder residual: the same numbers in every layout, the same generated tokens, and the overlap
of tensor-parallel reductions with compute, proven by delaying each reduction."""

import pytest
import torch

from launch.spawn import run_ranks
from tests.training import SCRATCH_RUN_DIR, SMALL, losses, train


def test_ladder_is_not_the_standard_residual(tmp_path):
    """Fails if the wiring silently fell back to the standard residual."""
    standard = losses(train(tmp_path / "standard", ["train.dtype=float64", "model.n_layers=4"]))
    ladder = losses(train(tmp_path / "ladder", ["train.dtype=float64", "model.n_layers=4", "model.residual=ladder"]))
    assert ladder[0] == pytest.approx(standard[0], rel=1e-6)  # the same initial weights...
    # ...a different function (the same one would agree to ~1e-15 in fp64)
    assert max(abs(a - b) / a for a, b in zip(ladder, standard)) > 1e-6


def _build(world, residual, n_layers=4, dim=64, extra=()):
    from launch.config import compose
    from launch.validate import validate
    from parallel.groups import build_groups
    from parallel.parallelize import parallelize
    from runtime.model import ModelArgs, Transformer
    from runtime.trace import Tracer

    cfg = compose([*SMALL, f"model.residual={residual}", f"model.n_layers={n_layers}", f"model.dim={dim}",
                   f"parallel.tp={world}", "train.dtype=float64", SCRATCH_RUN_DIR, *extra])
    groups = build_groups(validate(cfg, world), "cpu", timeout_s=60)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_config(cfg.model)).double()
    par = parallelize(model, groups, cfg, torch.device("cpu"), Tracer(False))
    return par


def _generate(rank, world, residual):
    from parallel.tensor import gather_logits
    from runtime.generate import generate

    par = _build(world, residual)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    return generate(par.model, prompt, 12, gather_logits=lambda x: gather_logits(x, par.groups)).tolist()


@pytest.mark.parametrize("residual", ["ladder", "standard"])
def test_generated_tokens_are_identical_under_tensor_parallelism(residual):
    one = run_ranks(_generate, 1, args=(residual,))[0]
    for world in (2, 4):
        assert run_ranks(_generate, world, args=(residual,)) == [one] * world
    assert len(one[0]) == 17


L = 4


def _overlap(rank, world, residual, train_step):
    """(collectives, the most in flight at once) of one forward (and backward) over L layers."""
    from launch.slowlink import SlowLink

    par = _build(world, residual, n_layers=L, dim=32)
    model = par.model
    tokens = torch.randint(0, 256, (1, 8))
    with SlowLink() as link:  # records when each all-reduce is posted and waited for
        if train_step:
            par.loss_fn(model(tokens), tokens).backward()
        else:
            with torch.no_grad():
                model(tokens)
    return link.collectives, link.max_in_flight()


def test_ladder_overlaps_each_reduction_with_compute():
    """Forward over L layers: the standard residual waits for each of its 2·L all-reduces before
    the next branch starts; the ladder posts the next branch's reduction while one is in flight,
    so each reduction spans the next branch's compute (the time it saves: benchmarks/ladder.py)."""
    n_std, std_in_flight = run_ranks(_overlap, 2, args=("standard", False))[0]
    n_lad, lad_in_flight = run_ranks(_overlap, 2, args=("ladder", False))[0]
    assert n_std == n_lad == 2 * L + 1  # two per block, and the vocabulary-parallel embedding's
    assert std_in_flight == 1
    assert lad_in_flight >= 2


def test_ladder_overlaps_the_backward_reductions_too():
    n_std, std_in_flight = run_ranks(_overlap, 2, args=("standard", True))[0]
    n_lad, lad_in_flight = run_ranks(_overlap, 2, args=("ladder", True))[0]
    assert n_std >= 4 * L and n_lad >= 4 * L  # forward and backward reductions
    assert std_in_flight == 1
    assert lad_in_flight >= 2
