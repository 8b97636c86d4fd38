
import pytest

from runtime.model import ModelArgs, Transformer
from runtime.optim import build_optimizer, lr_at
from launch.config import compose


def test_warmup_then_cosine_to_the_floor():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_at(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_norm_weights_are_not_decayed():
    model = Transformer(ModelArgs(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=8))
    opt = build_optimizer(model.parameters(), compose().optim, lr=1e-3)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {p.dim() for p in plain["params"]} == {1} and len(plain["params"]) == 3
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
