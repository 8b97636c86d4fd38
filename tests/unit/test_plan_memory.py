"""The memory estimate's parts behave as the layouts say, and the calibration it needs is
measured in a few seconds and survives JSON."""
import dataclasses
import json

import pytest
import torch

from launch.config import compose
from launch.planner.calibrate import memory_calibration
from launch.planner.estimate import Calibration, estimate_memory
from launch.planner.layouts import Layout
from runtime.model import ModelArgs

TINY = ModelArgs.from_config(compose(["model=tiny", "run_dir=unused"]).model)
CAL = Calibration(600e6, 20e3, 0.01, 24e3, 49e3)


def _layout(**kw):
    base = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 1, "ep": 1, "etp": 1, "micro_batch_size": 4,
            "activation_checkpoint": "none", "schedule": "1f1b", "moe_backend": "ep"}
    return Layout(**{**base, **kw})


def _estimate(dp_impl="fsdp", **kw):
    return estimate_memory(TINY, _layout(**kw), seq_len=256, global_batch_size=16, dtype="float32",
                           dp_impl=dp_impl, calibration=CAL)


def test_total_is_the_sum_of_the_named_parts():
    e = _estimate(dp=2)
    parts = {k: v for k, v in dataclasses.asdict(e).items() if k != "pp_rank"}
    assert e.total == pytest.approx(sum(parts.values()))
    assert all(v >= 0 for v in parts.values())


def test_layouts_move_the_parts_they_should():
    one, fsdp, ddp = _estimate(), _estimate(dp=2), _estimate(dp=2, dp_impl="ddp")
    assert fsdp.parameters == pytest.approx(one.parameters / 2, rel=0.01) and fsdp.comm_buffers > 0
    assert ddp.parameters == one.parameters and ddp.comm_buffers == one.gradients
    cp = _estimate(cp=2)
    assert cp.cp_ring_buffers > 0 and one.cp_ring_buffers == 0
    assert cp.activations == pytest.approx(one.activations / 2)
    full = _estimate(dp=2, activation_checkpoint="full")
    assert full.activations < fsdp.activations / 2 and full.heap_slack < fsdp.heap_slack
    # Slack in proportion to the saved activations: (24k / 20k − 1) of them.
    assert one.heap_slack == pytest.approx(one.activations * 0.2)


def test_calibration_measures_a_model():
    cal = memory_calibration(TINY, torch.float32, 1.0)
    data = json.loads(json.dumps(dataclasses.asdict(cal)))
    assert Calibration(**data) == cal
    # The heap grows by at least what a layer saves; the ends (logits, loss, working set) cost.
    assert cal.layer_heap_bytes_per_token >= cal.block_bytes_per_token > 0
    assert cal.ends_heap_bytes_per_token > 0


def test_expert_elements_are_the_experts_of_a_rank():
    from launch.config import compose
    from launch.planner.memory import rank_elements
    from runtime.model import ModelArgs

    args = ModelArgs.from_config(compose(["model=tiny_moe", "run_dir=unused"]).model)
    m = args.moe
    per_layer = 3 * args.dim * m.expert_ffn_dim * m.num_experts
    # ep2 over two ranks, no FSDP: half the experts of every layer; FSDP over edp=2 with ep=1: half of all.
    assert rank_elements(args, 1, 1, 1, 1, 2, 2, 1, False, 0, experts_only=True) == args.n_layers * per_layer // 2
    assert rank_elements(args, 1, 1, 1, 1, 2, 1, 1, True, 0, experts_only=True) == args.n_layers * per_layer // 2
    assert rank_elements(args, 1, 1, 1, 1, 2, 2, 1, False, 0) > args.n_layers * per_layer // 2


@pytest.mark.parametrize("preset, extra", [("tiny_deepseek", []), ("tiny_deepseek", ["model.mtp_depth=1"]),
                                           ("tiny_moe", ["model.moe.shared_experts=1"])])
def test_one_rank_counts_the_models_parameters(preset, extra):
    """The planner's per-rank count on one rank is the model's: latent attention's projections,
    multi-token prediction's blocks, shared experts (whole on every TP rank)."""
    from launch.planner.memory import rank_elements
    from runtime.model import ModelArgs, Transformer, num_params

    args = ModelArgs.from_config(compose([f"model={preset}", *extra, "run_dir=/x"]).model)
    with torch.device("meta"):
        total = num_params(Transformer(args))
    assert rank_elements(args, 1, 1, 1, 1, 1, 1, 1, False, 0) == total
    # Tensor parallelism splits what it splits and keeps the latent projections whole.
    assert total // 2 < rank_elements(args, 2, 1, 1, 1, 1, 1, 2, False, 0) < total
