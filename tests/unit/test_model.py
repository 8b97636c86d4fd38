"""The model: shapes, attention against a hand-written reference, splittability, initialisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from parallel.materialize import canonical_name, initial_values, materialize, name_seed
from runtime.model import ModelArgs, Transformer, apply_rotary, causal_attention, rotary_tables

ARGS = ModelArgs(n_layers=3, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=50)


def build(args=ARGS, seed=0, dtype=torch.float64):
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    materialize(model, initial_values(model.init_full, seed), torch.device("cpu"))
    return model


def test_forward_gives_logits_per_position():
    model = build()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 7))
    assert model(tokens).shape == (2, 7, ARGS.vocab_size)


def test_grouped_query_attention_matches_a_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 5, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out = causal_attention(q, k, v)
    # Query head h reads KV head h // 2; position i sees positions ≤ i.
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), vv)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_rotary_embedding_is_relative():
    """q·k after rotation depends only on the distance between positions."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def dot(i, j):
        ci, si = rotary_tables(torch.tensor([i]), 16, 10000.0, torch.float64)
        cj, sj = rotary_tables(torch.tensor([j]), 16, 10000.0, torch.float64)
        return (apply_rotary(q, ci, si) * apply_rotary(k, cj, sj)).sum()

    torch.testing.assert_close(dot(3, 1), dot(12, 10))
    assert not torch.isclose(dot(3, 1), dot(3, 2))


def test_the_model_splits_into_stages_that_compose_to_the_whole():
    """Layers keyed by index, embedding and head optional: two parts run in sequence equal the
    whole model (what pipeline parallelism relies on)."""
    whole = build()
    first, second = build(), build()
    first.norm = first.output = None
    del first.layers["2"]
    second.tok_embeddings = None
    del second.layers["0"], second.layers["1"]
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9))
    torch.testing.assert_close(second(first(tokens)), whole(tokens), rtol=0, atol=0)


def test_initialisation_is_a_function_of_seed_and_name_only():
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        if "norm" not in name:
            assert not torch.equal(pa, pc)
    # A deeper model shares the values of the layers both have, except depth-scaled projections.
    deep = build(ModelArgs(**{**ARGS.__dict__, "n_layers": 5}), seed=3)
    assert torch.equal(deep.layers["1"].attention.wq.weight, a.layers["1"].attention.wq.weight)


def test_initial_scales():
    model = build(ModelArgs(n_layers=2, dim=256, n_heads=8, n_kv_heads=4, ffn_dim=512, vocab_size=256))
    std = lambda t: t.double().std().item()  # noqa: E731
    assert std(model.tok_embeddings.weight) == pytest.approx(1.0, rel=0.05)
    assert std(model.layers["0"].attention.wq.weight) == pytest.approx(0.02 * 0.987, rel=0.05)  # truncated at 3σ
    assert std(model.layers["0"].feed_forward.w2.weight) == pytest.approx(0.02 / 2 * 0.987, rel=0.05)
    assert std(model.output.weight) == pytest.approx(256**-0.5 * 0.987, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))
    # So the first loss is near ln(vocab): nothing is predicted yet.
    tokens = torch.randint(0, 256, (4, 32))
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - math.log(256)) < 1.0


def test_wrapper_prefixes_do_not_change_names_or_seeds():
    assert canonical_name("module._orig_mod.layers.0._checkpoint_wrapped_module.attention.wq.weight") == \
        "layers.0.attention.wq.weight"
    assert name_seed(0, "a") != name_seed(0, "b") != name_seed(1, "a")
    assert name_seed(0, "a") == 0x0 + name_seed(0, "a")  # stable: no Python hash randomisation


def test_every_parameter_declares_its_initialisation_and_tensor_parallel_style():
    from launch.config import compose
    from runtime.model import declared

    for overrides in (["model=tiny"], ["model=tiny_moe", "model.moe.shared_experts=1"], ["model.residual=ladder"]):
        with torch.device("meta"):
            model = Transformer(ModelArgs.from_config(compose([*overrides, "run_dir=/x"]).model))
        for name, _ in [*model.named_parameters(), *model.named_buffers()]:
            declared(model, name, "init_plan", innermost=True)
        for name, _ in model.named_parameters():
            declared(model, name, "tp_plan", innermost=False)


def test_a_parameter_without_declarations_is_an_error_naming_it():
    """A new parameter gets neither a silent default value nor a silent tensor-parallel split."""
    from runtime.model import FeedForward, declared

    class Gated(FeedForward):
        def __init__(self, dim, ffn_dim):
            super().__init__(dim, ffn_dim)
            self.gate = torch.nn.Parameter(torch.empty(ffn_dim))

    with torch.device("meta"):
        model = Transformer(ModelArgs.tiny())
        model.layers["0"].feed_forward = Gated(model.args.dim, model.args.ffn_dim)
    with pytest.raises(KeyError, match="layers.0.feed_forward.gate has no init_plan declaration"):
        model.init_full("layers.0.feed_forward.gate", torch.Size([688]), torch.Generator())
    with pytest.raises(KeyError, match="layers.0.feed_forward.gate has no tp_plan declaration"):
        declared(model, "layers.0.feed_forward.gate", "tp_plan", innermost=False)


@pytest.mark.parametrize("residual", ["standard", "ladder"])
def test_generation_with_the_kv_cache_equals_recomputing_the_whole_sequence(residual):
    from dataclasses import replace

    from runtime.generate import generate

    model = build(replace(ARGS, residual=residual))
    prompt = torch.randint(0, ARGS.vocab_size, (2, 4), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 6)
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, tokens)


def test_a_document_mask_keeps_each_document_to_itself():
    """Packed documents under the mask: changing one document changes no other document's logits,
    and each document gets the logits it has alone (positions restart, no earlier key is seen)."""
    from runtime.data.loader import document_ids

    model = build()
    tokens = torch.randint(1, ARGS.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    tokens[:, [7, 15]] = 0  # end of document: three documents, [0, 8), [8, 16), [16, 24)
    other = tokens.clone()
    other[:, 8:15] = torch.randint(1, ARGS.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = model(tokens, documents=document_ids(tokens, 0))
        changed = model(other, documents=document_ids(other, 0))
        alone = model(tokens[:, 16:])
        unmasked, unmasked_changed = model(tokens), model(other)
    for docs in (slice(0, 8), slice(16, 24)):
        torch.testing.assert_close(changed[:, docs], packed[:, docs], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed[:, 16:], alone, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(changed[:, 8:16], packed[:, 8:16])
    assert not torch.allclose(unmasked_changed[:, 16:], unmasked[:, 16:])  # without the mask it leaks
