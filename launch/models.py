"""The model presets (configs/model/), with total and active parameters and FLOPs per token.

    python -m launch.models                  # every preset, FLOPs at train.seq_len=4096
    python -m launch.models --seq-len 8192

Counts come from building each model on the meta device (no memory), so they are the model's
own; FLOPs per token are MFU's numerator (runtime/flops.py: forward and backward).
"""
from __future__ import annotations

import argparse

import torch

from launch.config import CONFIG_DIR, compose
from runtime.flops import active_params, flops_per_token
from runtime.model import ModelArgs, Transformer, num_params


def presets() -> list[str]:
    """Every model config but `hf`, whose architecture is a folder's (model.hf_path)."""
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if p.stem != "hf")


def describe(name: str, seq_len: int) -> dict:
    args = ModelArgs.from_config(compose([f"model={name}", "run_dir=unused"]).model)
    with torch.device("meta"):
        total = num_params(Transformer(args))
    return {"model": name, "total": total, "active": active_params(args, total),
            "flops_per_token": flops_per_token(args, seq_len), "layers": args.n_layers, "dim": args.dim,
            "vocab": args.vocab_size, "experts": args.moe.num_experts if args.moe else 0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length of the FLOPs count")
    args = parser.parse_args(argv)
    print(f"{'preset':22}{'total':>10}{'active':>10}{'layers':>8}{'dim':>7}{'experts':>9}{'vocab':>9}"
          f"{'TFLOP/token':>13}")
    for name in presets():
        d = describe(name, args.seq_len)
        print(f"{name:22}{d['total'] / 1e9:>9.3f}B{d['active'] / 1e9:>9.3f}B{d['layers']:>8}{d['dim']:>7}"
              f"{d['experts']:>9}{d['vocab']:>9,}{d['flops_per_token'] / 1e12:>13.4f}")


if __name__ == "__main__":
    main()
