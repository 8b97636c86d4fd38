"""Multi-head latent attention and multi-token prediction, one process.

- Generation from the cached latent (keys' up-projection absorbed into the queries, values'
  applied after the softmax) gives the logits of the whole sequence recomputed without a cache,
  and the cache holds kv_lora_rank + qk_rope_head_dim values per token and layer.
- Multi-token prediction: the loss's value is the main loss, its gradient that of the V3 paper's
  L_main + λ/D Σ_k L^k, written out here position by position from the token sequence.
(Against transformers' DeepseekV3: tests/unit/test_hf.py.)
"""
import pytest
import torch
import torch.nn.functional as F

from parallel.materialize import initial_values, materialize
from runtime.generate import KVCache
from runtime.mla import MLAArgs
from runtime.model import ModelArgs, RopeScaling, Transformer
from runtime.moe import MoEArgs

YARN = RopeScaling("yarn", 4.0, 32, mscale=0.707, mscale_all_dim=1.0)


def model_of(**changes) -> Transformer:
    args = ModelArgs(**{**dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=4, ffn_dim=96, vocab_size=128,
                               mla=MLAArgs(16, 24, 12, 8, 10), rope_scaling=YARN), **changes})
    with torch.device("meta"):
        model = Transformer(args).double()
    materialize(model, initial_values(model.init_full, 0), torch.device("cpu"))
    with torch.no_grad():  # norms away from 1, so that a norm left out shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


@pytest.mark.parametrize("q_lora_rank", [24, 0])
def test_cached_latent_generation_equals_recomputing_the_sequence(q_lora_rank):
    model = model_of(mla=MLAArgs(16, q_lora_rank, 12, 8, 10)).eval()
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    cache = KVCache()
    with torch.no_grad():
        steps = [model(tokens[:, :12], torch.arange(12), cache=cache)[:, -1]]
        for i in range(12, 20):  # one token at a time, attending to the cache
            steps.append(model(tokens[:, i:i + 1], torch.tensor([i]), cache=cache)[:, 0])
        expected = model(tokens)[:, 11:]
    got = torch.stack(steps, dim=1)
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()
    # The cache is the latent and the shared rotary key: 16 + 8 values per token and layer.
    assert len(cache.layers) == 2
    for layer in cache.layers.values():
        assert layer.k.shape == (2, 20, 16) and layer.v.shape == (2, 20, 1, 8)


def test_multi_token_prediction_adds_the_papers_objective():
    depth, weight = 2, 0.3
    model = model_of(mtp_depth=depth, mtp_loss_weight=weight,
                     moe=MoEArgs(num_experts=4, top_k=2, expert_ffn_dim=32, aux_loss_coef=0.0))
    model.eval()  # no balancing losses: the objective is the token losses alone
    sequence = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))
    tokens, labels = sequence[:, :-1], sequence[:, 1:]
    loss = model.loss_fn(model(tokens, labels=labels), labels)
    main = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="sum")
    assert torch.allclose(loss, main, rtol=1e-12)  # the reported value: the main loss
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    # The paper's modules, position by position: depth k at position i reads token i+k and the
    # previous depth's state there, and predicts token i+k+1.
    s = tokens.shape[1]
    h = model.norm(model.layers["1"](model.layers["0"](model.tok_embeddings(tokens), inputs(model, s)),
                                     inputs(model, s)))
    objective = main
    for k in range(1, depth + 1):
        block = model.layers[str(1 + k)]
        ahead = torch.stack([sequence[:, min(i + k, s)] for i in range(s)], dim=1)
        h = block(h, inputs(model, s), embedding=model.tok_embeddings(ahead))
        logits = model.output(block.head_norm(h))
        targets = [(i, sequence[:, i + k + 1]) for i in range(s) if i + k + 1 <= s]
        loss_k = sum(F.cross_entropy(logits[:, i], t, reduction="sum") for i, t in targets)
        objective = objective + weight / depth * loss_k
    expected = torch.autograd.grad(objective, list(model.parameters()), allow_unused=True)
    for (name, _), g, e in zip(model.named_parameters(), grads, expected):
        assert (g is None) == (e is None), name
        if g is not None:
            assert torch.allclose(g, e, rtol=1e-9, atol=1e-12), name


def inputs(model, s):
    from runtime.layers import AttentionInputs, rotary_tables
    a = model.args
    return AttentionInputs(*rotary_tables(torch.arange(s), a.rope_dim, a.rope_theta, torch.float64, a.rope_scaling))
