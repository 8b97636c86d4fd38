"""Published architectures: each preset's parameter counts equal the published ones, and the
features they need (independent head size, QK-norm, QKV biases, tied embeddings, Llama 3.1's
RoPE scaling) behave as their definitions say."""
import math
from dataclasses import replace

import pytest
import torch

from launch.models import describe, presets
from parallel.materialize import initial_values, materialize
from runtime.model import ModelArgs, RopeScaling, Transformer, rotary_frequencies

# (total, active) in billions as published (model cards, papers), as written there.
PUBLISHED = {
    "llama3_1b": ("1.24", None), "llama3_3b": ("3.21", None), "llama3_8b": ("8.03", None),
    "llama3_70b": ("70.6", None), "llama3_405b": ("405.9", None), "qwen3_0.6b": ("0.6", None),
    "qwen3_8b": ("8.2", None), "qwen3_32b": ("32.8", None), "qwen3_moe_30b_a3b": ("30.5", "3.3"),
    "qwen3_moe_235b_a22b": ("235", "22"), "mixtral_8x7b": ("46.7", "12.9"), "mixtral_8x22b": ("141", "39"),
    "deepseek_v3": ("671", "37"), "deepseek_v2_lite": ("15.7", "2.4"),
}
# DeepSeek's activated counts leave out the embedding lookup (V3: 37.55B with it, 36.63B
# without; V2-Lite: 2.66B and 2.45B — only the latter is "2.4B").
ACTIVE_WITHOUT_EMBEDDING = {"deepseek_v3", "deepseek_v2_lite"}


def test_every_published_preset_is_listed():
    assert set(PUBLISHED) <= set(presets())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_the_published_ones(name):
    total, active = PUBLISHED[name]
    d = describe(name, 4096)
    # Totals within 0.5%, or half a unit of the last published digit for a figure as coarse as
    # "0.6". Active counts are published with two or three digits, rounded or cut (Qwen3-30B-A3B's
    # 3.35B is "3.3B"): within one unit of their last digit.
    unit = lambda figure: 10 ** -len(figure.partition(".")[2])  # noqa: E731
    allowed = max(0.005 * float(total), unit(total) / 2)
    assert abs(d["total"] / 1e9 - float(total)) <= allowed, (name, d["total"] / 1e9, total)
    if active is not None:
        got = d["active"] - (d["vocab"] * d["dim"] if name in ACTIVE_WITHOUT_EMBEDDING else 0)
        assert abs(got / 1e9 - float(active)) <= unit(active), (name, got / 1e9, active)


ARGS = ModelArgs(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64)


def build(args):
    with torch.device("meta"):
        model = Transformer(args).double()
    materialize(model, initial_values(model.init_full, 0), torch.device("cpu"))
    return model


def test_head_size_qk_norm_biases_and_tied_embeddings_shape_the_model():
    args = replace(ARGS, head_dim=16, qk_norm=True, qkv_bias=True, tie_embeddings=True)
    model = build(args)
    attn = model.layers["0"].attention
    assert attn.wq.weight.shape == (4 * 16, 32) and attn.wk.weight.shape == (2 * 16, 32)
    assert attn.wo.weight.shape == (32, 4 * 16)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (16,)
    assert attn.wq.bias is not None and attn.wo.bias is None
    assert model.output.weight is model.tok_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert "output.weight" not in names and "tok_embeddings.weight" in names
    assert torch.equal(attn.wq.bias, torch.zeros(64))
    tokens = torch.randint(0, 64, (2, 9))
    assert model(tokens).shape == (2, 9, 64)


def test_llama3_rope_scaling_matches_the_definition():
    """Llama 3.1's frequencies (reference: Meta's `apply_scaling`, written out here)."""
    s = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)
    got = rotary_frequencies(128, 500000.0, s)
    base = rotary_frequencies(128, 500000.0)
    expected = []
    for f in base.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            expected.append(f)
        elif wavelen > 8192 / 1.0:
            expected.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)
    assert got[0] == base[0] and got[-1] == base[-1] / 8.0  # the highest frequency kept, the lowest stretched
