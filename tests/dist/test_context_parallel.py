"""Context parallelism against one process: ring and Ulysses attention alone (outputs, input and
weight gradients), whole training runs composed with TP, PP and DP, and activation memory."""
import pytest
import torch

from launch.spawn import run_ranks

TOL = dict(rtol=1e-10, atol=1e-12)


def _cfg(impl: str, seq_len: int):
    """What apply_cp reads of the run config."""
    from types import SimpleNamespace

    return SimpleNamespace(parallel=SimpleNamespace(cp_impl=impl), train=SimpleNamespace(seq_len=seq_len))


def _attention(rank, world, impl, seq_len, n_heads, n_kv_heads):
    from types import SimpleNamespace

    from parallel.context import apply_cp, local_positions
    from parallel.groups import build_groups
    from parallel.mesh import Topology
    from runtime.model import Attention, AttentionInputs, ModelArgs, rotary_tables

    topo = Topology.from_config(SimpleNamespace(tp=1, cp=world, pp=1, ep=1, etp=-1, dp=-1, order="tp-cp-ep-dp-pp"), world)
    groups = build_groups(topo, "cpu", timeout_s=30)
    args = ModelArgs(n_layers=1, dim=8 * n_heads, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=8, vocab_size=8)
    torch.manual_seed(0)
    full = Attention(args).double()
    local = Attention(args).double()
    local.load_state_dict(full.state_dict())
    holder = SimpleNamespace(layers={"0": SimpleNamespace(attention=local)})
    apply_cp(holder, groups, _cfg(impl, seq_len))
    positions = holder.positions
    assert torch.equal(positions, local_positions(seq_len, world, rank))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, seq_len, args.dim, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, seq_len, args.dim, generator=g, dtype=torch.float64)
    xf = x.clone().requires_grad_()
    out_f = full(xf, AttentionInputs(*rotary_tables(torch.arange(seq_len), args.head_dim, 1e4, torch.float64)))
    out_f.backward(grad_out)
    xl = x[:, positions].clone().requires_grad_()
    out_l = local(xl, AttentionInputs(*rotary_tables(positions, args.head_dim, 1e4, torch.float64)))
    out_l.backward(grad_out[:, positions])
    torch.testing.assert_close(out_l, out_f[:, positions], **TOL)
    torch.testing.assert_close(xl.grad, xf.grad[:, positions], **TOL)
    # Weight gradients: each rank's covers its tokens; summed over CP they are the whole.
    for name, p in local.named_parameters():
        total = p.grad.clone()
        torch.distributed.all_reduce(total, group=groups["cp"])
        torch.testing.assert_close(total, full.get_parameter(name).grad, **TOL)
    return True


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
@pytest.mark.parametrize("world, chunk", [(2, 1), (2, 3), (4, 5), (4, 2)])
def test_attention_equals_full_causal_attention(impl, world, chunk):
    """Chunk sizes 1, 3, 5: any sequence length divisible by 2·cp works (no block size)."""
    n_heads, n_kv_heads = 8, 2 if impl == "ring" else 4  # GQA; Ulysses with fewer KV heads than cp too
    run_ranks(_attention, world, args=(impl, 2 * world * chunk, n_heads, n_kv_heads))


def test_ulysses_with_kv_heads_fewer_than_cp_ranks():
    run_ranks(_attention, 4, args=("ulysses", 16, 4, 2))


def _attention_activation_bytes(rank, world, seq_len):
    """Bytes autograd keeps for backward from one attention layer (projections, rotary and the
    attention core) on this rank, measured by a saved-tensor hook."""
    from types import SimpleNamespace

    from parallel.context import apply_cp
    from parallel.groups import build_groups
    from parallel.mesh import Topology
    from runtime.model import Attention, AttentionInputs, ModelArgs, rotary_tables

    args = ModelArgs(n_layers=1, dim=64, n_heads=8, n_kv_heads=4, ffn_dim=8, vocab_size=8)
    attn = Attention(args)
    positions = torch.arange(seq_len)
    if world > 1:
        topo = Topology.from_config(SimpleNamespace(tp=1, cp=world, pp=1, ep=1, etp=-1, dp=-1, order="tp-cp-ep-dp-pp"), world)
        holder = SimpleNamespace(layers={"0": SimpleNamespace(attention=attn)})
        apply_cp(holder, build_groups(topo, "cpu", timeout_s=30), _cfg("ring", seq_len))
        positions = holder.positions
    x = torch.randn(1, len(positions), args.dim, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn(x, AttentionInputs(*rotary_tables(positions, args.head_dim, 1e4, torch.float32)))
    out.sum().backward()
    return sum(storages.values())


def test_attention_activation_memory_at_cp4_is_at_most_0_35_of_cp1():
    seq_len = 1024
    one = run_ranks(_attention_activation_bytes, 1, args=(seq_len,))[0]
    four = run_ranks(_attention_activation_bytes, 4, args=(seq_len,))
    assert max(four) <= 0.35 * one, (four, one)
