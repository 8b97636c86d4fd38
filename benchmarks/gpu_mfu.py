"""Model FLOPs utilisation on one GPU: a ~1B-parameter Llama-style model and an MoE of similar
active size, bf16, sequence 4096, through `launch.train`'s code path.

Contenders, side by side in one process:
- dense-1B: 22 layers, dim 2048, 16 heads (8 KV), SwiGLU 5632, vocabulary 32,000 — 1.17B
  parameters (1.10B in matrices); bf16 autocast, torch.compile per block, fused AdamW, flash
  attention through scaled_dot_product_attention.
- dense-1B eager: the same without torch.compile.
- dense-1B FSDP×1: the same compiled model wrapped in FSDP2 over a group of one rank (bf16
  parameter gathering, fp32 reduction): the wrapper's cost, which torchtitan pays on one GPU.
- moe: 16 layers, 8 experts of hidden 2816, top-2 (the dense model's active MLP per token) —
  2.5B parameters, 0.82B active per token.
Each reports the median tokens/s of its steps after warm-up (compilation), TFLOP/s per GPU from
runtime/flops.py, and MFU against the device's dense bf16 datasheet peak (runtime/accounting.py).

    python -m benchmarks.gpu_mfu            # ~6 minutes on an H100
    python -m benchmarks.gpu_mfu --quick    # dense-1B only, fewer steps (~2 minutes)
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile

import torch

from benchmarks.common import emit, median

DENSE_1B = ["model.n_layers=22", "model.dim=2048", "model.n_heads=16", "model.n_kv_heads=8", "model.ffn_dim=5632",
            "model.vocab_size=32000"]
MOE = ["model.n_layers=16", "model.dim=2048", "model.n_heads=16", "model.n_kv_heads=8", "model.ffn_dim=5632",
       "model.vocab_size=32000", "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_ffn_dim=2816"]
RUN = ["data=synthetic", "train.seq_len=4096", "train.micro_batch_size=2", "train.global_batch_size=8",
       "train.dtype=bfloat16", "logging.every=1", "checkpoint.every=0", "optim.warmup_steps=2"]
CONTENDERS = {  # name → (model, extra overrides, FSDP over one rank)
    "dense-1B": (DENSE_1B, ["train.compile=true"], False),
    "dense-1B eager": (DENSE_1B, [], False),
    "dense-1B FSDP×1": (DENSE_1B, ["train.compile=true"], True),
    "moe": (MOE, ["train.compile=true"], False),
}
WARMUP = 4  # steps dropped: compilation, allocator warm-up


@contextlib.contextmanager
def fsdp_over_one_rank(enabled: bool):
    """quintet leaves a data-parallel group of one unwrapped; give it the world's group of one
    so that parallelize() applies FSDP2 to it, as torchtitan does on one GPU."""
    if not enabled:
        yield
        return
    import torch.distributed as dist

    import launch.train

    real = launch.train.build_groups

    def with_dp_group(*args, **kwargs):
        groups = real(*args, **kwargs)
        groups.handles["dp_cp"] = dist.group.WORLD
        return groups

    launch.train.build_groups = with_dp_group
    try:
        yield
    finally:
        launch.train.build_groups = real


def measure(overrides: list[str], steps: int, fsdp: bool = False) -> dict:
    """Train `steps` steps in this process (a world of one) and summarise the steady state."""
    from launch.config import compose
    from launch.train import run
    from runtime.metrics import read_events, read_metrics

    with tempfile.TemporaryDirectory() as run_dir, fsdp_over_one_rank(fsdp):
        run(compose([*overrides, f"train.steps={steps}", f"run_dir={run_dir}"]))
        records, start = read_metrics(run_dir)[WARMUP:], read_events(run_dir, "start")[-1]
    return {"tokens_per_s": median(r["tokens_per_s"] for r in records),
            "tflops_per_device": median(r["tflops_per_device"] for r in records),
            "mfu": median(r["mfu"] for r in records), "memory_gib": max(r["memory_gib"] for r in records),
            "flops_per_token": start["flops_per_token"], "peak_tflops": start["peak_tflops_per_device"],
            "peak_source": start["peak_source"], "final_loss": records[-1]["loss"] if records else None}


def flash_attention_runs(device: torch.device) -> bool:
    """Whether the flash kernel takes the model's attention (head size 128, GQA, causal, bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from runtime.model import causal_attention

    q = torch.randn(1, 4096, 16, 128, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 4096, 8, 128, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            causal_attention(q, kv, kv)
        return True
    except RuntimeError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="dense-1B only, 10 steps")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu_mfu measures MFU on a CUDA GPU, and this machine has none "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Run it on a GPU node; "
              "benchmarks.overhead measures the CPU path.", file=sys.stderr)
        return 2
    logging.getLogger("quintet").setLevel(logging.WARNING)
    device = torch.device("cuda", 0)
    steps = args.steps or (10 if args.quick else 20)
    names = ["dense-1B"] if args.quick else list(CONTENDERS)
    results = {}
    for name in names:
        model, extra, fsdp = CONTENDERS[name]
        results[name] = r = measure([*model, *RUN, *extra, "train.device=cuda"], steps, fsdp)
        print(f"{name:16s} {r['tokens_per_s']:9,.0f} tokens/s  {r['tflops_per_device']:6.1f} TFLOP/s  "
              f"MFU {r['mfu']:6.1%}  peak memory {r['memory_gib']:5.1f} GiB", flush=True)
        torch.cuda.empty_cache()
    dense = results["dense-1B"]
    print(f"\ndevice {torch.cuda.get_device_name(device)}; peak {dense['peak_tflops']:.1f} TFLOP/s "
          f"({dense['peak_source']}); flash attention: {flash_attention_runs(device)}")
    ratios = {}
    if "dense-1B FSDP×1" in results:
        ratios["fsdp_over_plain"] = results["dense-1B FSDP×1"]["tokens_per_s"] / dense["tokens_per_s"]
        ratios["compiled_over_eager"] = dense["tokens_per_s"] / results["dense-1B eager"]["tokens_per_s"]
        print(f"FSDP×1 / plain {ratios['fsdp_over_plain']:.3f}; compiled / eager {ratios['compiled_over_eager']:.3f}")
    print(f"dense-1B MFU {dense['mfu']:.1%} (target ≥ 50%)")
    emit("gpu_mfu", {"device": torch.cuda.get_device_name(device), "steps": steps, "warmup": WARMUP,
                     "results": results, **ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
