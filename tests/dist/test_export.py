"""`python -m launch.export`: a checkpoint saved with tp=2 becomes a Hugging Face Llama folder
whose logits, computed the way Hugging Face's Llama computes them (rotate-half rotary
embedding, q/k/v/o and gate/up/down projections), equal quintet's."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from launch.load import load_checkpoint
from tests.training import train
from launch.spawn import scaled

REPO = Path(__file__).resolve().parents[2]


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def hf_llama_logits(w: dict, c: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Hugging Face's LlamaForCausalLM forward, written from its conventions, in float64."""
    w = {k: v.double() for k, v in w.items()}
    b, s = tokens.shape
    hd, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    inv = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate_half(x):
        return torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)

    h = w["model.embed_tokens.weight"][tokens]
    mask = torch.full((s, s), -math.inf, dtype=torch.float64).triu(1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"], c["rms_norm_eps"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(b, s, nh, hd).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(b, s, nkv, hd).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(b, s, nkv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        h = h + att.transpose(1, 2).reshape(b, s, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(h, w["model.norm.weight"], c["rms_norm_eps"]) @ w["lm_head.weight"].T


def test_export_matches_hugging_face_llama_semantics(tmp_path):
    run = tmp_path / "run"
    train(run, ["parallel.tp=2", "train.steps=3", "checkpoint.every=3"], world_size=2)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(run), str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    weights, config = load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2

    model = load_checkpoint(run / "checkpoints/step_00000003", torch.float64)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
    theirs = hf_llama_logits(weights, config, tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    assert len(weights) == 3 + 9 * 2  # nothing but the model's weights


def test_export_refuses_what_has_no_transformers_equivalent(tmp_path):
    run = tmp_path / "ladder"
    train(run, ["model.residual=ladder", "train.steps=1", "checkpoint.every=1"])
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(run), str(tmp_path / "x")], cwd=REPO,
                          capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 2 and "the ladder residual has no transformers architecture" in proc.stderr
    assert not (tmp_path / "x").exists()
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(tmp_path / "nothing"), str(tmp_path / "y")],
                          cwd=REPO, capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 2 and "neither a checkpoint" in proc.stderr


def test_a_tied_llama_3_2_shaped_model_exports_to_transformers(tmp_path):
    """Tied embeddings, a head size of its own and Llama 3.1's RoPE scaling, read by transformers'
    own LlamaForCausalLM: the same logits as quintet's, to fp32's precision (transformers computes
    the rotary angles in fp32 even for an fp64 model; the exact fp64 check is the test above)."""
    from transformers import LlamaForCausalLM

    features = ["model.head_dim=32", "model.tie_embeddings=true", "model.rope_scaling.type=llama3",
                "model.rope_scaling.original_max_position_embeddings=16", "model.rope_theta=500000"]
    run = tmp_path / "run"
    train(run, [*features, "train.steps=3", "checkpoint.every=3"])
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(run), str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    model = load_checkpoint(run, torch.float64)
    assert model.output.weight is model.tok_embeddings.weight
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float64).eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
