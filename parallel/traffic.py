"""Count what a rank sends: calls and bytes per process group and collective kind.

    with CollectiveCounter(groups) as counter:
        ...one step...
    counter.table   # {"tp": {"all_reduce": {"calls": 4, "bytes": 65536}}, "dp_cp": {...}}

It wraps torch.distributed's collective and point-to-point functions (what quintet's
collectives, FSDP2, the pipeline and the MoE dispatchers call) for the duration of the block.
A call's bytes are its input payload, what this rank puts on the wire before the algorithm
multiplies it (an all-reduce's tensor, an all-gather's or reduce-scatter's input, a send's
tensor; a receive counts 0). A group is named by the names `build_groups` gave its handle (one
handle can carry several names when their ranks coincide, as dp and dp_cp without CP: joined
with "/"). The same counter serves a real run and a rehearsal (launch/rehearse.py), whose calls
go through the same code.
"""
from __future__ import annotations

import functools

import torch

from parallel.monitor import patch_communication, restore_communication

# The argument holding the payload this rank sends, per function (by name, else the first).
_PAYLOAD = {"all_gather_single": "input_tensor", "reduce_scatter_single": "input", "all_gather_into_tensor": "input_tensor",
            "reduce_scatter_tensor": "input", "all_to_all_single": "input", "all_gather": "tensor",
            "reduce_scatter": "input_list", "all_to_all": "input_tensor_list"}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CollectiveCounter:
    def __init__(self, groups):
        self.names: dict[int, str] = {}
        for name, handle in groups.handles.items():
            if handle is not None:
                self.names[id(handle)] = f"{self.names[id(handle)]}/{name}" if id(handle) in self.names else name
        self.table: dict[str, dict[str, dict[str, int]]] = {}
        # The same per microbatch of a pipeline step, while `microbatch` names the one running.
        self.microbatch: int | None = None
        self.per_microbatch: dict[int, dict[str, dict[str, dict[str, int]]]] = {}
        self._originals: dict = {}
        self._inside = False  # a deprecated name calling its successor counts once

    def __enter__(self) -> "CollectiveCounter":
        self._originals = patch_communication(self._wrap)
        return self

    def __exit__(self, *exc) -> None:
        restore_communication(self._originals)
        self._originals.clear()

    def _wrap(self, name: str, fn, params: list[str]):
        g_at = params.index("group")
        payload = _PAYLOAD.get(name, params[0])  # barrier: its group, no bytes
        p_at = params.index(payload)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._inside:
                return fn(*args, **kwargs)
            group = kwargs.get("group", args[g_at] if len(args) > g_at else None)
            key = self.names.get(id(group), "world") if group is not None else "world"
            sent = 0 if name in ("recv", "irecv") else _nbytes(kwargs.get(payload, args[p_at] if len(args) > p_at else None))
            tables = [self.table] if self.microbatch is None else \
                [self.table, self.per_microbatch.setdefault(self.microbatch, {})]
            for table in tables:
                entry = table.setdefault(key, {}).setdefault(name, {"calls": 0, "bytes": 0})
                entry["calls"] += 1
                entry["bytes"] += sent
            self._inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside = False

        return counted
