"""Export a checkpoint's model as one safetensors file with Hugging Face Llama names.

    python -m launch.export runs/myrun/checkpoints/step_00001000 out/   # or runs/myrun (its latest)

Reads either engine's files in any layout (the blocks are reassembled into full tensors), and
writes `out/model.safetensors` and `out/config.json` (a LlamaConfig). quintet rotates
interleaved pairs (x[2i], x[2i+1]) of each head, Meta's convention; Hugging Face's Llama rotates
the two halves, so the rows of q_proj and k_proj are permuted per head to match (the same
permutation Hugging Face's own Llama conversion applies). Dense models with the standard
residual only: an MoE or ladder model has no Llama equivalent.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from runtime.checkpoint.dcp_format import dcp_index, is_dcp_checkpoint, load_dcp_blocks
from runtime.checkpoint.format import CheckpointError, dtype_named, load_blocks, read_index, verify_index_files
from runtime.checkpoint.resume import candidates, read_trainer_state

EXIT_BAD_INPUT = 2


@dataclass
class FullBlock:
    """A block that is the whole tensor: loading it reassembles the tensor from any layout."""

    key: str
    local: torch.Tensor

    @property
    def full_shape(self):
        return list(self.local.shape)

    def coords(self):
        return [[0, n] for n in self.local.shape]


def checkpoint_dir(path: Path) -> Path:
    """A step directory, or the one `latest` names under a run or checkpoints directory (a
    marker naming anything but a step directory beside it is refused)."""
    for candidate in (path, path / "checkpoints"):
        if (candidate / "latest").exists():
            paths, problems = candidates(candidate)
            if problems:
                raise CheckpointError(problems[0][1])
            return paths[0]
    if (path / "trainer.json").exists():
        return path
    raise CheckpointError(f"{path} is neither a checkpoint (no trainer.json) nor a directory with a `latest` marker")


def stored_tensors(step_dir: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    """Every stored tensor's full shape and dtype, from either engine's index."""
    if is_dcp_checkpoint(step_dir):
        return {key: (e[0]["full_shape"], e[0]["dtype"]) for key, e in dcp_index(step_dir).items()}
    return {key: (e[0]["full_shape"], dtype_named(e[0]["dtype"])) for key, e in read_index(step_dir).items()}


def run_config(step_dir: Path, explicit: Path | None, trainer_state: dict):
    """The model config: --config's, else the one the checkpoint recorded, else the run's."""
    if explicit is None and isinstance(trainer_state.get("model"), dict):
        return OmegaConf.create(trainer_state["model"])
    path = explicit or step_dir.parent.parent / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"no run config at {path}: pass --config <run_dir>/config.yaml")
    return OmegaConf.load(path).model


def hf_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from interleaved pairs (0,1),(2,3),… to halves (0,2,…),(1,3,…)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state(full: dict[str, torch.Tensor], m) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": full["tok_embeddings.weight"], "model.norm.weight": full["norm.weight"]}
    if not m.get("tie_embeddings"):  # tied: transformers makes lm_head the embedding (tie_word_embeddings)
        out["lm_head.weight"] = full["output.weight"]
    names = {"attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
    for i in range(m.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "self_attn.q_proj.weight"] = hf_permute(full[ours + "attention.wq.weight"], m.n_heads)
        out[theirs + "self_attn.k_proj.weight"] = hf_permute(full[ours + "attention.wk.weight"], m.n_kv_heads)
        for a, b in names.items():
            out[theirs + b] = full[ours + a]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(m, dtype: torch.dtype) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": m.dim,
              "intermediate_size": m.ffn_dim, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
              "num_key_value_heads": m.n_kv_heads, "head_dim": m.get("head_dim") or m.dim // m.n_heads,
              "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "hidden_act": "silu",
              "tie_word_embeddings": bool(m.get("tie_embeddings")), "attention_bias": False, "mlp_bias": False,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    r = m.get("rope_scaling")
    if r is not None and str(r.type) == "llama3":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                                  "high_freq_factor": r.high_freq_factor,
                                  "original_max_position_embeddings": r.original_max_position_embeddings}
    return config


def export(checkpoint: Path, out: Path, config: Path | None = None) -> Path:
    from safetensors.torch import save_file

    step_dir = checkpoint_dir(checkpoint)
    trainer_state = read_trainer_state(step_dir)
    verify_index_files(step_dir, trainer_state.get("index_crc32"))
    m = run_config(step_dir, config, trainer_state)
    if m.moe.num_experts or str(m.residual) != "standard" or m.get("qk_norm") or m.get("qkv_bias"):
        raise CheckpointError(f"model {m.name!r} is not a dense Llama (num_experts={m.moe.num_experts}, residual="
                              f"{m.residual}, qk_norm={m.get('qk_norm', False)}, qkv_bias={m.get('qkv_bias', False)}); "
                              "only dense Llama-style models with the standard residual export to Llama names")
    blocks = [FullBlock(key, torch.zeros(shape, dtype=dtype)) for key, (shape, dtype) in stored_tensors(step_dir).items()
              if key.startswith("model/")]
    if is_dcp_checkpoint(step_dir):
        load_dcp_blocks(step_dir, blocks)
    else:
        load_blocks(step_dir, blocks)
    full = {b.key.removeprefix("model/"): b.local for b in blocks}
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state(full, m)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": str(step_dir)})
    dtype = next(iter(tensors.values())).dtype
    (out / "config.json").write_text(json.dumps(hf_config(m, dtype), indent=2) + "\n")
    return out / "model.safetensors"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a step directory, or a run/checkpoints directory (its latest)")
    parser.add_argument("out", type=Path, help="output directory for model.safetensors and config.json")
    parser.add_argument("--config", type=Path, default=None, help="the run's config.yaml (default: beside the run)")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, args.config)
    except (CheckpointError, KeyError) as e:
        print(f"quintet: cannot export {args.checkpoint}: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as e:
        print(f"quintet: cannot export {args.checkpoint} to {args.out}: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(path)


if __name__ == "__main__":
    main()
