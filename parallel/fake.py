"""A fake world for one rank of a large job: torch's fake process group (a collective returns at
once, nothing is sent) and fake tensors (shapes and dtypes, no storage), with the integers that
decide shapes kept real.

Fake tensors have no values, so an op whose output shape depends on values (`bincount`,
`tolist`, a boolean mask) cannot run on them. The values that size an MoE dispatch — which expert
each token goes to, how many rows go to each rank — are integer bookkeeping made from integer
factories (`arange`) under forced-balance routing (runtime/moe.py), never from the model's
floating-point data. `ShapeMode` therefore runs for real every op whose tensor inputs are all
real (on a device, not meta), and the factories of integer and boolean tensors; only the model's
floating-point data is fake. Those real integers cross ranks in a few collectives (the token counts of an all-to-all);
`symmetric_peers` fills what such a collective receives as if every peer held what this rank
holds — true of forced-balance routing, where every rank routes its tokens alike — and reports
every fake collective complete as soon as it is issued.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves

from parallel.monitor import patch_communication, restore_communication

_INTEGRAL = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
_ARANGE = {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step}


def _integral_factory(func, args, kwargs) -> bool:
    dtype = kwargs.get("dtype")
    if dtype is None and func in _ARANGE:
        return all(isinstance(a, int) for a in args)
    return dtype in _INTEGRAL


class ShapeMode(FakeTensorMode):
    """Fake tensors for the model's data, real ones for the bookkeeping that sizes it."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, FakeTensor) for a in args):  # the common case, decided without a walk
            return super().__torch_dispatch__(func, types, args, kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # (A meta tensor is a model not yet given storage: its storage is to be fake.)
        real = all(not isinstance(t, FakeTensor) and not t.is_meta for t in tensors)
        if real and (tensors or _integral_factory(func, args, kwargs)):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _real(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor)


def _fill(name: str, args: tuple, kwargs: dict, group) -> None:
    """What a collective over real tensors receives when every peer holds this rank's values."""
    n = dist.get_world_size(group)
    if name == "all_gather":  # (outputs, input)
        outputs, tensor = kwargs.get("tensor_list", args[0]), kwargs.get("tensor", args[1] if len(args) > 1 else None)
        if _real(tensor):
            for out in outputs:
                out.copy_(tensor)
    elif name in ("all_gather_into_tensor", "all_gather_single"):  # (output, input)
        out, inp = args[0], args[1]
        if _real(inp):
            out.copy_(inp.repeat(n, *([1] * (inp.dim() - 1))))
    elif name == "all_to_all_single":  # (output, input, output_split_sizes, input_split_sizes)
        out, inp = args[0], args[1]
        if _real(inp) and len(args) < 3 and not kwargs.get("output_split_sizes"):
            # Every peer sends me what I send the peer at my place: its chunk for me is my chunk for me.
            mine = inp.view(n, -1)[dist.get_group_rank(group, dist.get_rank()) if group is not None else dist.get_rank()]
            out.copy_(mine.repeat(n).view_as(out))
    elif name == "all_reduce":  # a sum over equal peers is n times mine
        tensor, op = args[0], kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM)
        if _real(tensor) and op == dist.ReduceOp.SUM:
            tensor.mul_(n)


class _Done:
    """A fake collective's work, complete as soon as it is issued (nothing is sent), as a
    real one is once its peer has received; its future holds the tensor it was given (what
    DDP's communication hook reads)."""

    def __init__(self, work, tensor):
        self.work, self.tensor = work, tensor

    def is_completed(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        future = torch.futures.Future()
        future.set_result([self.tensor])
        return future

    def wait(self, *args, **kwargs):
        return self.work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.work, name)


@contextlib.contextmanager
def symmetric_peers():
    """Collectives over real tensors receive what equal peers would send (see the module's doc)."""

    def wrap(name, fn, params):
        g_at = params.index("group")

        @functools.wraps(fn)
        def filled(*args, **kwargs):
            work = fn(*args, **kwargs)
            group = kwargs.get("group", args[g_at] if len(args) > g_at else None)
            _fill(name, args, kwargs, group)
            return _Done(work, args[0] if args else None) if work is not None else None

        return filled

    originals = patch_communication(wrap)
    try:
        yield
    finally:
        restore_communication(originals)


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int):
    """torch's fake backend as the default process group of `rank` in a world of `world_size`."""
    from torch.distributed.tensor.debug import _clear_fast_path_sharding_prop_cache, _clear_python_sharding_prop_cache
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # DTensor caches sharding decisions by mesh, and a mesh compares equal to the last world's
        # one of the same ranks: a cached decision would name that world's (destroyed) groups.
        _clear_python_sharding_prop_cache()
        _clear_fast_path_sharding_prop_cache()
