"""What one rank holds of the training state: the bytes of its local pieces of every parameter,
gradient and optimizer state, as the real run allocates them (DTensors counted by their local
shard; a parameter shared by two modules, as tied embeddings are, is one Parameter, counted
once). The same function measures a real rank and a rehearsed one (launch/rehearse.py), so the
two can differ only where the layouts' pieces do."""
from __future__ import annotations

import functools
import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def state_bytes(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer | None = None) -> dict:
    """{"parameters", "gradients", "optimizer"} bytes of this rank: gradients where backward has
    made them, the optimizer's per-parameter tensors (AdamW's moments; its step counters too)."""
    unique = list({id(p): p for p in parameters}.values())
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()
                                           if isinstance(v, torch.Tensor)]
    return {"parameters": _bytes(unique), "gradients": _bytes(p.grad for p in unique if p.grad is not None),
            "optimizer": _bytes(state)}


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes of live tensor storage during a block, and the phase it happened in.

        with LiveBytes(baseline=state) as live:
            live.phase = "forward"; ...
        live.peak, live.peak_phase

    Every storage an op creates is counted from its creation to its release (its last reference
    gone), at its current size: FSDP2 frees and re-allocates an unsharded parameter by resizing
    its storage, so `UntypedStorage.resize_` is followed too. What existed before the block is
    `baseline` bytes (the parameters and optimizer state), except storages the block resizes,
    which count from their first resize. The same count serves a real rank (CPU tensors have no
    allocator statistics) and a rehearsed one on fake tensors, whose storages have sizes but no
    memory; it sees tensors, not the allocator's rounding, caching or fragmentation.
    """

    def __init__(self, baseline: int = 0):
        super().__init__()
        self.live = self.peak = baseline
        self.phase = self.peak_phase = "before the step"
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted
        self._resize = None

    def _track(self, storage, nbytes: int) -> None:
        key = id(storage)
        if key not in self._sizes:
            weakref.finalize(storage, self._release, key)
            self._sizes[key] = 0
        self.live += nbytes - self._sizes[key]
        self._sizes[key] = nbytes
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase
            if self.phase == "forward and backward":  # which of the two, from autograd's engine
                self.peak_phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __enter__(self):
        original = self._resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            out = original(storage, size)
            tracker._track(storage, storage.nbytes())
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        self._sizes.clear()  # finalizers of storages still alive release nothing now
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _allocates(func):
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.layout == torch.strided:
                    storage = t.untyped_storage()
                    if id(storage) not in self._sizes:
                        self._track(storage, storage.nbytes())
        return out


@functools.cache
def _allocates(func) -> bool:
    """Whether an op's outputs are new storage: not when they alias an input (a view, an in-place
    or out= op), as its schema says."""
    schema = getattr(func, "_schema", None)
    return schema is None or not any(r.alias_info is not None for r in schema.returns)
