"""Bridge for users of megatron-core modules: initialise `megatron.core.parallel_state` from a
quintet topology and prove that its groups are ours.

megatron-core keeps its groups in module globals; quintet passes its own explicitly. Both come
from the same layout rule, so a model mixing megatron-core layers with quintet's runtime sees
one set of groups. `init_megatron_parallel_state` raises if any group differs.

    pytest tests/dist/test_groups.py -k megatron
"""
from __future__ import annotations

import torch.distributed as dist

from parallel.mesh import Topology


def _megatron_getters():
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_group,
        "cp": ps.get_context_parallel_group,
        "dp": lambda: ps.get_data_parallel_group(with_context_parallel=False),
        "pp": ps.get_pipeline_model_parallel_group,
        "dp_cp": lambda: ps.get_data_parallel_group(with_context_parallel=True),
        "tp_cp": ps.get_tensor_and_context_parallel_group,
        "model": ps.get_model_parallel_group,
        "ep": ps.get_expert_model_parallel_group,
        "etp": ps.get_expert_tensor_parallel_group,
        "edp": ps.get_expert_data_parallel_group,
        "tp_ep": ps.get_expert_tensor_and_model_parallel_group,
    }


def megatron_group_differences(topology: Topology, rank: int) -> dict[str, tuple[list[int], list[int]]]:
    """{group name: (quintet's ranks, megatron-core's ranks)} for every group of `rank` that differs."""
    out = {}
    for name, getter in _megatron_getters().items():
        ours = topology.group_of(name, rank)
        theirs = dist.get_process_group_ranks(getter())
        if ours != theirs:
            out[name] = (ours, theirs)
    return out


def init_megatron_parallel_state(topology: Topology, timeout_minutes: int = 10) -> None:
    """Initialise megatron-core's parallel_state on the current world to match `topology`."""
    from megatron.core import parallel_state as ps

    if dist.get_world_size() != topology.world_size:
        raise ValueError(f"the topology is for {topology.world_size} ranks, the world has {dist.get_world_size()}")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=topology.tp,
        pipeline_model_parallel_size=topology.pp,
        context_parallel_size=topology.cp,
        expert_model_parallel_size=topology.ep,
        expert_tensor_parallel_size=topology.etp,
        order=topology.order,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=False,  # one backend; megatron's gloo copies are for CPU-side tools
    )
    differences = megatron_group_differences(topology, dist.get_rank())
    if differences:
        detail = "; ".join(f"{n}: quintet {a} vs megatron-core {b}" for n, (a, b) in differences.items())
        raise RuntimeError(f"megatron-core's groups differ from quintet's on rank {dist.get_rank()}: {detail}")
