"""The planner's step-time model: links under the placement, the schedule's bubble, shared devices."""
import dataclasses

import pytest

from launch.config import compose
from parallel.mesh import Topology
from parallel.strategies.holmes.network import place
from parallel.pipeline.schedules import theoretical_bubble
from parallel.strategies.holmes.placement import RankInfo, described_ranks
from launch.planner.layouts import Layout
from launch.planner.links import LinkRates, Links
from launch.planner.steptime import DeviceRates, estimate_step
from runtime.model import ModelArgs

MIXED = compose(["cluster=mixed_4x2", "run_dir=unused"])
PROCS = described_ranks(MIXED.cluster.nodes, 8)
# Between classes RDMA falls back to sockets: slower than either class.
RATES = LinkRates(intra_node=10e9, nic={"ib": 1e9, "ethernet": 0.1e9}, cross_class=0.05e9)


def _links(placement: str, **sizes) -> Links:
    topo = Topology(world_size=8, **sizes)
    return Links(place(topo, PROCS, MIXED.cluster, placement), PROCS, RATES)


def test_holmes_keeps_the_gradient_reduction_off_the_slow_links():
    megatron = _links("megatron", tp=2, pp=2, dp=2).time("dp_cp", "all_reduce", 1e8)
    holmes = _links("holmes", tp=2, pp=2, dp=2).time("dp_cp", "all_reduce", 1e8)
    # Megatron's order puts each DP pair across an ib and an ethernet node: a ring of two moves
    # the buffer once each way across classes, two groups through each node's link.
    assert megatron == pytest.approx(2 * 1e8 / 0.05e9)
    # Holmes: stage 0's pairs between the ib nodes, stage 1's between the ethernet nodes.
    assert holmes == pytest.approx(2 * 1e8 / 0.1e9)
    # Within a node the TP groups use the fast internal link.
    assert _links("holmes", tp=2, pp=2, dp=2).time("tp", "all_gather", 1e8) == pytest.approx(0.5 * 1e8 / 10e9)


def test_groups_sharing_a_nic_share_its_bandwidth():
    one_node = [RankInfo(node=n, local_rank=0, nic="ib") for n in range(2)]
    two_per_node = [RankInfo(node=n // 2, local_rank=n % 2, nic="ib") for n in range(4)]
    alone = Links(Topology(world_size=2, dp=2), one_node, RATES).time("dp", "all_reduce", 1e8)
    shared = Links(Topology(world_size=4, tp=2, dp=2), two_per_node, RATES).time("dp", "all_reduce", 1e8)
    assert shared == pytest.approx(2 * alone)


ARGS = ModelArgs.from_config(compose(["model.n_layers=8", "run_dir=unused"]).model)
FREE = LinkRates(intra_node=float("inf"), nic={"ethernet": float("inf")})
DEVICE = DeviceRates(flops=1e10, memory_bandwidth=1e12)


def _step(layout: Layout, device=DEVICE, rates=FREE, **kw):
    procs = [RankInfo(node=0, local_rank=i, nic="ethernet") for i in range(layout.tp * layout.pp * layout.cp * layout.dp)]
    topo = Topology(world_size=len(procs), tp=layout.tp, pp=layout.pp, cp=layout.cp, dp=layout.dp)
    return estimate_step(ARGS, layout, Links(topo, procs, rates), device, seq_len=256, global_batch_size=16,
                         dtype="float32", dp_impl="fsdp", **kw)


@pytest.mark.parametrize("schedule,vpp", [("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 1)])
def test_the_bubble_is_the_simulated_schedule_s(schedule, vpp):
    layout = Layout(1, 4, vpp, 1, 1, 1, 1, 2, "none", schedule, "ep")
    step = _step(layout)
    m = 16 // 2
    assert step.bubble / step.compute == pytest.approx(theoretical_bubble(schedule, 4, vpp, m), rel=0.05)


def test_recomputation_costs_what_checkpointing_recomputes():
    base = Layout(1, 1, 1, 1, 1, 1, 1, 4, "none", "1f1b", "ep")
    full = _step(dataclasses.replace(base, activation_checkpoint="full")).compute
    selective = _step(dataclasses.replace(base, activation_checkpoint="selective")).compute
    assert _step(base).compute < selective < full
    assert full / _step(base).compute == pytest.approx(4 / 3, rel=0.05)  # F + 2F + F of the head aside


def test_a_shared_device_bounds_the_step_by_the_total_work():
    deep = Layout(1, 4, 1, 1, 1, 1, 1, 4, "none", "1f1b", "ep")  # 4 microbatches over 4 stages: half idle
    own = _step(deep)
    shared = _step(deep, device=dataclasses.replace(DEVICE, flops_shared=DEVICE.flops / 4))
    assert own.shared == 0 and own.bubble > 0
    # Four ranks on one device's worth of throughput: the step is their total work.
    assert shared.total == pytest.approx(4 * (own.compute + own.optimizer), rel=1e-6)


def test_measured_collective_costs_and_call_overhead_enter_every_collective():
    pair = [RankInfo(node=0, local_rank=i, nic="ib") for i in range(2)]
    topo = Topology(world_size=2, tp=2)
    ring = Links(topo, pair, LinkRates(intra_node=1e9))
    gloo = Links(topo, pair, LinkRates(intra_node=1e9, latency_s=1e-4, cost={"reduce_scatter": 2.0}, call_s=1e-3))
    assert ring.time("tp", "reduce_scatter", 1e8) == pytest.approx(0.5 * 1e8 / 1e9)
    # gloo's reduce-scatter moves an all-reduce's bytes; each call pays the library's fixed cost.
    assert gloo.time("tp", "reduce_scatter", 1e8) == pytest.approx(1e8 / 1e9 + 1e-4 + 1e-3)
    assert gloo.time("tp", "all_gather", 1e8, calls=4) == pytest.approx(0.5 * 1e8 / 1e9 + 4 * (1e-4 + 1e-3))
    assert gloo.hop("tp", 0, 1, 1e8) == pytest.approx(1e8 / 1e9 + 1e-4)  # a pipeline's send is no call


CALLS = dataclasses.replace(FREE, call_s=1e-3)  # links free: only the calls cost


@pytest.mark.parametrize("ac,per_block", [("none", 8), ("full", 12)])
def test_tensor_parallelism_pays_every_collective_sequence_parallelism_makes(ac, per_block):
    """Per microbatch: a gather into and a reduce-scatter out of attention and the MLP, the
    mirrors in backward (and the recomputed forward's under full checkpointing); the embedding's
    reduce-scatter and its gather; the head's gather, the loss's two all-reduces and the
    gather's reduce-scatter."""
    layout = Layout(2, 1, 1, 1, 1, 1, 2, 4, ac, "1f1b", "ep")
    m = 16 // 4
    assert _step(layout, rates=CALLS).tp == pytest.approx(m * (per_block * ARGS.n_layers + 2 + 4) * 1e-3)


def test_collective_calls_are_work_on_a_shared_device():
    layout = Layout(2, 1, 1, 1, 1, 1, 2, 4, "none", "1f1b", "ep")
    own = _step(layout, rates=CALLS)
    shared = _step(layout, device=dataclasses.replace(DEVICE, flops_shared=DEVICE.flops / 4), rates=CALLS)
    assert shared.total == pytest.approx(4 * (own.compute + own.tp + own.optimizer), rel=1e-6)


def test_ring_attention_exposes_the_kv_gradients_hops_and_each_exchange_is_a_call():
    """With free links and a 1 ms call, the K/V hops hide under the attention (forward: cp − 1,
    backward: cp − 1 again); the K/V gradients' cp hops in backward show. Every exchange is work
    on a shared device."""
    layout = Layout(1, 1, 1, 2, 1, 1, 1, 4, "none", "1f1b", "ep")
    m, cp = 16 // 4, 2
    own = _step(layout, rates=CALLS)
    assert own.cp == pytest.approx(m * ARGS.n_layers * cp * 1e-3)
    shared = _step(layout, device=dataclasses.replace(DEVICE, flops_shared=DEVICE.flops / 4), rates=CALLS)
    calls = m * ARGS.n_layers * (3 * cp - 2) * 1e-3
    assert shared.total == pytest.approx(4 * (own.compute + calls + own.optimizer), rel=1e-6)


def test_a_pipeline_pays_each_hop_s_own_link():
    """Four stages on two nodes: the middle hop crosses the NIC, the others stay inside a node;
    on four nodes every hop crosses one. The sends delay the schedule by what their links take."""
    rates = LinkRates(intra_node=float("inf"), nic={"ib": 1e7})
    layout = Layout(1, 4, 1, 1, 1, 1, 1, 4, "none", "1f1b", "ep")
    topo = Topology(world_size=4, pp=4)
    two = Links(topo, [RankInfo(node=r // 2, local_rank=r % 2, nic="ib") for r in range(4)], rates)
    four = Links(topo, [RankInfo(node=r, local_rank=0, nic="ib") for r in range(4)], rates)
    assert two.hop("pp", 0, 1, 1e6) == 0 and two.hop("pp", 2, 1, 1e6) == pytest.approx(0.1)
    assert [four.hop("pp", r, r + 1, 1e6) for r in range(3)] == pytest.approx([0.1] * 3)

    def step(links):
        return estimate_step(ARGS, layout, links, DEVICE, seq_len=256, global_batch_size=16, dtype="float32",
                             dp_impl="fsdp")

    sent = 4 * 256 * ARGS.dim * 4  # a microbatch's activations, float32
    hop = sent / 1e7
    on_two, on_four = step(two), step(four)
    # The fill and drain cross the one slow hop once each way; on four nodes three times.
    assert on_two.pp >= 2 * hop and on_four.pp >= 6 * hop
    assert on_two.pp < on_four.pp
    assert on_two.bubble == on_four.bubble == step(Links(topo, four.ranks, FREE)).bubble


def test_fsdp_pays_its_measured_hooks_every_microbatch_and_its_copies_per_gather_and_reduction():
    layout = Layout(1, 1, 1, 1, 2, 1, 1, 4, "none", "1f1b", "ep")
    m, elements = 16 // 2 // 4, 1_000_000
    costs = dataclasses.replace(DEVICE, fsdp_hook_s=3e-3, fsdp_gather_s=1e-9, fsdp_reduce_s=2e-9)

    def step(device, reshard=True, **kw):
        return _step(dataclasses.replace(layout, **kw), device=device, reshard_after_forward=reshard,
                     local_elements=elements // 2)

    bare, fsdp = step(DEVICE), step(costs)
    assert fsdp.compute - bare.compute == pytest.approx(m * ARGS.n_layers * 3e-3)
    # Resharding after forward gathers twice a microbatch; the reduction happens once a step.
    assert fsdp.dp - bare.dp == pytest.approx(elements * (2 * m * 1e-9 + 2e-9))
    assert step(costs, reshard=False).dp - step(DEVICE, reshard=False).dp == pytest.approx(elements * (m * 1e-9 + 2e-9))
    # A pipeline keeps the parameters gathered over the step's microbatches.
    deep = dict(pp=2, micro_batch_size=2)
    assert step(costs, **deep).dp - step(DEVICE, **deep).dp == pytest.approx(elements * (1e-9 + 2e-9))
