"""Mixture-of-Experts with expert parallelism against one process: the dispatcher with fixed,
skewed routings; whole training runs in folded and unfolded layouts; locality of the traffic."""
from types import SimpleNamespace

import pytest
import torch

from launch.spawn import run_ranks
from tests.training import train

TOL = dict(rtol=1e-10, atol=1e-12)
E, DIM, HIDDEN, TOKENS, K = 8, 16, 12, 10, 2


def _groups(world, ep, etp):
    from parallel.groups import build_groups
    from parallel.mesh import Topology

    cfg = SimpleNamespace(tp=etp, cp=1, pp=1, ep=ep, etp=etp, dp=-1, order="tp-cp-ep-dp-pp")
    return build_groups(Topology.from_config(cfg, world), "cpu", timeout_s=30)


def routing(kind: str, rank: int, g: torch.Generator):
    """Each rank's token-to-expert choice: uniform, or skewed so that every assignment goes to
    expert 0 or 1 — every other EP rank receives nothing — and rank 1 sends nothing at all."""
    if kind == "uniform":
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(TOKENS)])
    else:
        idx = torch.tensor([[0, 1]] * TOKENS)
    weights = torch.rand(TOKENS, K, generator=g, dtype=torch.float64)
    keep = None
    if kind == "skewed":
        keep = torch.ones(TOKENS, K, dtype=torch.bool)
        if rank == 1:
            keep[:] = False
    return idx, weights, keep


def _dispatch(rank, world, ep, etp, kind):
    from parallel.expert import apply_ep
    from parallel.sharding import ShardingPlan, local_block
    from runtime.moe import LocalDispatcher, MoE, MoEArgs

    groups = _groups(world, ep, etp)
    torch.manual_seed(0)  # the same full experts on every rank
    full = MoE(DIM, MoEArgs(E, K, HIDDEN), ffn_factory=None).double()
    for p in full.experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    local = MoE(DIM, MoEArgs(E, K, HIDDEN), ffn_factory=None).double()
    plan = ShardingPlan()
    holder = SimpleNamespace(layers={"0": SimpleNamespace(feed_forward=local)}, sharding=plan)
    apply_ep(holder, groups, SimpleNamespace(parallel=SimpleNamespace(moe_backend="ep", sp=True)))
    local.experts.to_empty(device="cpu")  # apply_ep leaves the slices on the meta device
    for name, p in local.experts.named_parameters():
        with torch.no_grad():
            p.copy_(full.experts.get_parameter(name)[local_block(plan, f"layers.0.feed_forward.experts.{name}", p)])

    # Every rank's tokens, and the reference over all of them with every expert here.
    gens = [torch.Generator().manual_seed(10 + r) for r in range(world)]
    xs = [torch.randn(TOKENS, DIM, generator=gens[r], dtype=torch.float64) for r in range(world)]
    routes = [routing(kind, r, gens[r]) for r in range(world)]
    grads = [torch.randn(TOKENS, DIM, generator=gens[r], dtype=torch.float64) for r in range(world)]
    ref_x = [x.clone().requires_grad_() for x in xs]
    for r in range(world):
        LocalDispatcher()(ref_x[r], full.experts, *routes[r]).backward(grads[r])

    x = xs[rank].clone().requires_grad_()
    out = local.dispatcher(x, local.experts, *routes[rank])
    out.backward(grads[rank])
    ref_out = LocalDispatcher()(xs[rank], full.experts, *routes[rank])
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x.grad, ref_x[rank].grad, **TOL)
    for name, p in local.experts.named_parameters():
        block = local_block(plan, f"layers.0.feed_forward.experts.{name}", p)
        torch.testing.assert_close(p.grad, full.experts.get_parameter(name).grad[block], **TOL)
    received = sum(local.dispatcher.bytes_to.values())
    return received


def _dispatch_both(rank, world, ep, etp):
    """Uniform and skewed routing in one launch (starting ranks costs more than the checks)."""
    return [_dispatch(rank, world, ep, etp, kind) for kind in ("uniform", "skewed")]


@pytest.mark.parametrize("world, ep, etp", [(2, 2, 1), (4, 4, 1), (8, 8, 1), (4, 2, 2), (8, 4, 2)])
def test_dispatcher_equals_one_process(world, ep, etp):
    run_ranks(_dispatch_both, world, args=(ep, etp))


def test_capacity_keeps_each_experts_best_assignments():
    from runtime.moe import capacity_keep

    # 6 tokens × top-2 over 4 experts at factor 1: capacity ceil(1·6·2/4) = 3 per expert.
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [1, 0], [2, 3]])
    w = torch.tensor([[.9, .1], [.5, .5], [.6, .4], [.7, .3], [.8, .2], [.55, .45]])
    keep = capacity_keep(w, idx, 4, 1.0)
    # Expert 0 has 5 assignments (weights .9 .5 .6 .7 .2): it keeps .9, .7, .6.
    assert keep.tolist() == [[True, True], [False, True], [True, True], [True, True], [True, False], [True, True]]
    assert capacity_keep(w, idx, 4, 10.0).all()


def test_dropped_assignments_contribute_nothing():
    from runtime.moe import LocalDispatcher, MoE, MoEArgs, capacity_keep

    torch.manual_seed(0)
    moe = MoE(DIM, MoEArgs(E, K, HIDDEN, capacity_factor=0.5), ffn_factory=None).double()
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(TOKENS, DIM, dtype=torch.float64)
    probs = moe.router(x).softmax(-1)
    idx = probs.topk(K).indices
    w = probs.gather(-1, idx)
    w = w / w.sum(-1, keepdim=True)
    keep = capacity_keep(w, idx, E, 0.5)
    assert 0 < int(keep.sum()) < TOKENS * K
    expected = LocalDispatcher()(x, moe.experts, idx, w * keep, None)  # a dropped pair weighs 0
    moe.loss_scale = 0.0
    torch.testing.assert_close(moe(x), expected, **TOL)


MOE = ["model=tiny_moe", "model.moe.expert_ffn_dim=48"]
def _cross_node_bytes(rank, world, overrides):
    from launch.config import compose
    from launch.train import setup

    run = setup(compose(overrides))
    run.trainer.train_step(0)
    sent = {}
    from runtime.moe import MoE

    for moe in (m for m in run.parallel.model.modules() if isinstance(m, MoE)):
        for dst, n in moe.dispatcher.bytes_to.items():
            sent[dst] = sent.get(dst, 0) + n
    node = lambda r: r // 4  # noqa: E731 - nodes of 4 ranks
    return sum(n for dst, n in sent.items() if node(dst) != node(rank)), sum(sent.values())


def test_folded_ep_keeps_the_dispatcher_inside_a_node(tmp_path):
    """8 ranks as 2 nodes of 4, tp=2 × dp=4 for attention: EP over 4 ranks folded onto TP×DP
    neighbours (etp=1) stays in the node; EP strided across data-parallel ranks (etp=tp=2, the
    unfolded layout) crosses it."""
    base = [*MOE, "parallel.tp=2", "parallel.sp=true", "parallel.ep=4", "train.micro_batch_size=4",
            "train.global_batch_size=16"]
    folded = run_ranks(_cross_node_bytes, 8, args=([*base, "parallel.etp=1", f"run_dir={tmp_path}/f"],))
    unfolded = run_ranks(_cross_node_bytes, 8, args=([*base, "parallel.etp=2", f"run_dir={tmp_path}/u"],))
    assert all(total > 0 for _, total in folded)
    assert sum(cross for cross, _ in folded) == 0
    assert sum(cross for cross, _ in unfolded) > 0


def test_aux_loss_free_balancing_moves_the_bias_toward_the_mean(tmp_path):
    records = train(tmp_path, [*MOE, "model.moe.bias_update_rate=0.01", "model.moe.aux_loss_coef=0",
                               "train.steps=3"], world_size=2)
    assert all(r["aux_loss"] == 0 for r in records)


def test_shared_expert_and_moe_every_other_layer_train(tmp_path):
    records = train(tmp_path, [*MOE, "model.moe.shared_experts=1", "model.moe.every=2", "parallel.ep=2"],
                    world_size=2)
    assert set(records[0]["expert_load"]) == {"0"}  # layers 0 is MoE, layer 1 dense
    assert records[-1]["loss"] < records[0]["loss"]
