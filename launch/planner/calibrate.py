"""What the planner measures instead of assuming, per model on this device: the bytes autograd
saves per token in one of the model's blocks (and the part selective checkpointing recomputes),
and how far the process heap grows when the model trains (the heap probe).

    from launch.planner.calibrate import memory_calibration
    python -m launch.planner.calibrate '<ModelArgs as JSON>' <n_layers> <dtype>   # one heap probe

The heap probe runs a truncated copy of the model (1 and PROBE_DEEP layers, real widths) through three
steps of 2 microbatches of 4×256 tokens and AdamW, in a fresh process with the runtime's
allocator settings (runtime/host_memory.py: freed memory stays in the heap), and reports the
heap's growth. A fresh process, because a calibrating process's heap already has holes that
would absorb the allocations; two depths, because the difference is what more layers cost
and the rest is what the ends (embedding, head, loss) and the libraries cost.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import json
import os
import subprocess
import sys

import torch
import torch.utils.checkpoint

from parallel.materialize import initial_values, materialize
from launch.planner.estimate import Calibration
from runtime.model import AttentionInputs, ModelArgs, Transformer, rotary_tables

CPU = torch.device("cpu")
PROBE_TOKENS = (4, 256)  # microbatch × sequence of the heap probe
PROBE_MICROBATCHES, PROBE_STEPS = 2, 3
PROBE_DEEP = 3  # layers of the deeper probe
# The floor's model (benchmarks/plan_memory.py measures its peak): one 8-wide layer.
FLOOR_MODEL = ["model.n_layers=1", "model.dim=8", "model.n_heads=1", "model.n_kv_heads=1", "model.ffn_dim=8",
               "model.moe.num_experts=0"]


def _saved_bytes(block, x, rope) -> int:
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope)
    return sum(seen.values())


def lone_block(args: ModelArgs, layer: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """Block `layer` of the model by itself, materialised with its initial values on `device`."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(**{**args.__dict__, "n_layers": layer + 1}))
    model.layers = torch.nn.ModuleDict({str(layer): model.layers[str(layer)]})
    model.tok_embeddings = model.output = None
    materialize(model, initial_values(model.init_full, 0), device)
    return model.layers[str(layer)].to(dtype)


def block_activations(args: ModelArgs, dtype: torch.dtype, tokens: int = 1024,
                      device: torch.device = CPU) -> tuple[float, float]:
    """(bytes saved per token by one block, the share of it in the attention core), averaged over
    the model's dense and MoE blocks as they occur."""
    kinds = sorted({args.is_moe(i) for i in range(args.n_layers)})
    per_token, attention = [], []
    for moe in kinds:
        layer = next(i for i in range(args.n_layers) if args.is_moe(i) == moe)
        block = lone_block(args, layer, device, dtype)
        x = torch.randn(1, tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
        rope = AttentionInputs(*rotary_tables(torch.arange(tokens, device=device), args.rope_dim, args.rope_theta,
                                              dtype))
        full = _saved_bytes(block, x, rope)
        core = block.attention.core
        block.attention.core = functools.partial(torch.utils.checkpoint.checkpoint, core, use_reentrant=False)
        selective = _saved_bytes(block, x, rope)
        block.attention.core = core
        weight = sum(args.is_moe(i) == moe for i in range(args.n_layers))
        per_token += [full / tokens] * weight
        attention += [(full - selective) / full] * weight
    return sum(per_token) / len(per_token), sum(attention) / len(attention)


def _args_json(args: ModelArgs) -> str:
    return json.dumps(dataclasses.asdict(args))


def _args_from_json(text: str) -> ModelArgs:
    from runtime.moe import MoEArgs

    raw = json.loads(text)
    if raw.get("moe") is not None:
        raw["moe"] = MoEArgs(**raw["moe"])
    return ModelArgs(**raw)


def _heap_bytes() -> int:
    """The process heap: what sbrk'd and mmap'd arenas hold (glibc's mallinfo2), freed or not."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.arena + info.hblkhd


def heap_probe(args: ModelArgs, dtype: torch.dtype) -> int:
    """Heap growth (bytes) of training `args` in this process: model, AdamW, PROBE_STEPS steps."""
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from runtime.host_memory import keep_freed_memory
    from runtime.optim import build_optimizer

    keep_freed_memory()
    torch.set_num_threads(1)  # as the training ranks run
    gen = torch.Generator().manual_seed(0)
    shape = (PROBE_MICROBATCHES, *PROBE_TOKENS)
    inputs = torch.randint(0, args.vocab_size, shape, generator=gen)
    labels = torch.randint(0, args.vocab_size, shape, generator=gen)
    optim = OmegaConf.create({"name": "adamw", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
                              "fused": None})
    base = _heap_bytes()
    model = Transformer(args).to(dtype)
    optimizer = build_optimizer(model.parameters(), optim, 1e-3)
    for _ in range(PROBE_STEPS):
        for m in range(PROBE_MICROBATCHES):
            F.cross_entropy(model(inputs[m]).flatten(0, 1).float(), labels[m].flatten(), reduction="sum").backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _heap_bytes() - base


def _probe_in_fresh_process(args: ModelArgs, layers: int, dtype: torch.dtype) -> int:
    one = _args_json(ModelArgs(**{**args.__dict__, "n_layers": layers}))
    # A fixed hash seed: the allocation order, and so the heap's holes, repeat from run to run.
    out = subprocess.run([sys.executable, "-m", "launch.planner.calibrate", one, str(dtype).removeprefix("torch.")],
                         capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    return int(out.stdout.strip().splitlines()[-1])


def memory_calibration(args: ModelArgs, dtype: torch.dtype, floor_bytes: float,
                       device: torch.device = CPU) -> Calibration:
    """Everything estimate_memory needs to know about `args` on this device (a few seconds)."""
    from launch.planner.memory import rank_elements

    per_token, share = block_activations(args, dtype, device=device)
    layer_heap = ends_heap = 0.0
    if device.type == "cpu":  # the heap is the peak only on CPU; CUDA counts allocated bytes
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            one, deep = pool.map(lambda n: _probe_in_fresh_process(args, n, dtype), (1, PROBE_DEEP))
        tokens = PROBE_TOKENS[0] * PROBE_TOKENS[1]
        size = torch.finfo(dtype).bits // 8

        def states(n: int) -> float:  # parameters, gradients and AdamW's two moments
            return 4 * size * rank_elements(ModelArgs(**{**args.__dict__, "n_layers": n}), 1, 1, 1, 1, 1, 1, 1,
                                            False, 0)

        # Per layer over PROBE_DEEP − 1 layers: one layer's difference is at the mercy of where a
        # few large holes fall.
        layer_heap = max(deep - one - (states(PROBE_DEEP) - states(1)), 0) / (PROBE_DEEP - 1) / tokens
        ends_heap = max(one - states(1) - layer_heap * tokens, 0) / tokens
    return Calibration(floor_bytes, per_token, share, layer_heap, ends_heap)


if __name__ == "__main__":
    print(heap_probe(_args_from_json(sys.argv[1]), getattr(torch, sys.argv[2])))
