"""DeepSeek-V3's router (runtime/moe.py `MoE.route`): sigmoid scores, the balancing bias in the
choice only, node-limited (group) routing, renormalised and scaled weights — against a direct
transcription of the V3 paper's equations and against transformers' DeepseekV3TopkRouter; and
the auxiliary-loss-free bias moving the load toward balance without any auxiliary loss."""
import math

import pytest
import torch

from runtime.moe import MoE, MoEArgs

E, K, GROUPS, TOPK_GROUPS, SCALE = 16, 4, 4, 2, 2.5


def deepseek_moe(**changes) -> MoE:
    args = MoEArgs(num_experts=E, top_k=K, expert_ffn_dim=8, score="sigmoid", n_group=GROUPS,
                   topk_group=TOPK_GROUPS, routed_scaling_factor=SCALE, bias_update_rate=1e-3, **changes)
    return MoE(16, args, lambda: None)


def transcription(u: torch.Tensor, bias: torch.Tensor):
    """DeepSeek-V3 (arXiv 2412.19437), eqs. 13-16 with the bias of §2.1.2 and the node-limited
    routing of §2.1.3, one token at a time: s_i = sigmoid(u_i); the choice ranks s_i + b_i within
    the TOPK_GROUPS groups whose two highest s + b sum highest; g_i = s_i / Σ_chosen s_j, × scale."""
    out = []
    per = E // GROUPS
    for t in range(u.shape[0]):
        s = [1 / (1 + math.exp(-float(x))) for x in u[t]]
        c = [s[i] + float(bias[i]) for i in range(E)]
        group_score = [sum(sorted(c[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(GROUPS)]
        groups = sorted(range(GROUPS), key=lambda g: -group_score[g])[:TOPK_GROUPS]
        candidates = [i for g in groups for i in range(g * per, (g + 1) * per)]
        chosen = sorted(candidates, key=lambda i: -c[i])[:K]
        total = sum(s[i] for i in chosen)
        out.append({i: SCALE * s[i] / total for i in chosen})
    return out


def test_the_router_is_the_papers_equations():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, E, generator=g, dtype=torch.float64) * 2
    moe = deepseek_moe()
    moe.expert_bias.copy_(torch.randn(E, generator=g) * 0.3)  # moved by balancing: the choice changes
    idx, weights, _ = moe.route(logits)
    expected = transcription(logits, moe.expert_bias)
    for t in range(logits.shape[0]):
        got = {int(i): float(w) for i, w in zip(idx[t], weights[t])}
        assert got.keys() == expected[t].keys(), f"token {t}"
        assert all(abs(got[i] - expected[t][i]) < 1e-12 for i in got)
    # The bias decides the choice, never the weight: with it, other experts are chosen, and each
    # chosen expert's weight is its own normalised score.
    moe.expert_bias.zero_()
    assert not torch.equal(moe.route(logits)[0].sort().values, idx.sort().values)


def test_the_router_is_transformers_deepseek_v3_router():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=E, num_experts_per_tok=K, n_group=GROUPS,
                                           topk_group=TOPK_GROUPS, routed_scaling_factor=SCALE, norm_topk_prob=True)
    theirs = DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(E, 32, generator=g))
        theirs.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    hidden = torch.randn(50, 32, generator=g)
    _, their_weights, their_idx = theirs(hidden)
    moe = deepseek_moe()
    moe.expert_bias.copy_(theirs.e_score_correction_bias)
    idx, weights, _ = moe.route(hidden @ theirs.weight.T)
    order, their_order = idx.sort(dim=-1), their_idx.sort(dim=-1)
    assert torch.equal(order.values, their_order.values)
    torch.testing.assert_close(weights.gather(-1, order.indices), their_weights.gather(-1, their_order.indices),
                               rtol=1e-6, atol=1e-7)


def test_the_bias_alone_moves_the_load_toward_balance():
    """No auxiliary loss: a router skewed toward a few experts, the bias updated from each step's
    loads (rate · sign(mean − load)), spreads the same tokens over the experts."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4096, E, generator=g) + torch.linspace(2.0, -2.0, E)  # experts 0.. favoured
    moe = deepseek_moe(aux_loss_coef=0.0, z_loss_coef=0.0)
    moe.args = MoEArgs(**{**moe.args.__dict__, "bias_update_rate": 0.02})

    def imbalance():
        counts = torch.bincount(moe.route(logits)[0].flatten(), minlength=E).double()
        return counts, float(counts.max() / counts.mean())

    counts, start = imbalance()
    for _ in range(300):
        moe.update_bias(counts)
        counts, now = imbalance()
    assert start > 3.0 and now < 1.35, (start, now)  # the fixed step leaves the loads oscillating near balance


def test_the_sequence_wise_balance_loss_is_the_papers():
    """V3's eqs. 17-20: per sequence, f_i = E / (K·T) · #tokens routed to i and P_i = mean over its
    tokens of s_i / Σ_j s_j; the loss is α Σ_i f_i P_i, here averaged over the sequences."""
    torch.manual_seed(3)
    moe = deepseek_moe(sequence_aux_loss=True, aux_loss_coef=0.1, z_loss_coef=0.0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    moe.expert_bias.zero_()
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    moe.double().train()
    moe(x)
    losses = []
    for seq in x:
        idx, _, scores = moe.route(moe.router(seq))
        s = scores / scores.sum(dim=-1, keepdim=True)
        f = torch.bincount(idx.flatten(), minlength=E).double() * E / (K * seq.shape[0])
        losses.append(float((f * s.mean(dim=0)).sum()))
    assert abs(float(moe.step_aux) - 0.1 * sum(losses) / len(losses)) < 1e-12


def test_forced_balance_loads_every_expert_alike_and_the_router_still_learns():
    """model.moe.force_balance: assignment j of token t goes to expert (t·k + j) mod E whatever the
    scores; the weights are still the scores' (renormalised, scaled), so the router gets a gradient."""
    moe = deepseek_moe(force_balance=True)
    x = torch.randn(4 * E, 16)
    logits = moe.router(x)
    idx, weights, scores = moe.route(logits)
    assert torch.equal(idx.reshape(-1), torch.arange(4 * E * K) % E)
    assert torch.bincount(idx.reshape(-1), minlength=E).tolist() == [4 * K] * E
    expected = scores.gather(-1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * moe.args.routed_scaling_factor
    torch.testing.assert_close(weights, expected)
    for p in moe.experts.parameters():  # built empty, as on the meta device
        torch.nn.init.normal_(p, std=0.02)
    moe(x.unsqueeze(0)).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
