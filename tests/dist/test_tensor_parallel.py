"""Tensor and sequence parallelism against one process.

Primitive tests: each parallel layer, built by `apply_tp` on 2 and 4 ranks, gives the outputs
and all gradients of the single-process layer holding the same full weights (fp64, exact up to
summation order). End-to-end tests: 20 training steps of each layout equal one process.
"""
import pytest
import torch
import torch.nn.functional as F

from launch.spawn import run_ranks
from tests.training import SCRATCH_RUN_DIR, SMALL

TOL = dict(rtol=1e-10, atol=1e-12)


def build(rank, world, sp, extra=()):
    """A full model and its TP version on this rank, both initialised from the same seed."""
    from launch.config import compose
    from launch.validate import validate
    from parallel.groups import build_groups
    from parallel.materialize import initial_values, materialize
    from parallel.parallelize import parallelize
    from runtime.model import ModelArgs, Transformer
    from runtime.trace import Tracer

    cfg = compose([*SMALL, f"parallel.tp={world}", f"parallel.sp={sp}", "train.dtype=float64",
                   SCRATCH_RUN_DIR, *extra])
    groups = build_groups(validate(cfg, world), "cpu", timeout_s=30)
    args = ModelArgs.from_config(cfg.model)
    with torch.device("meta"):
        full, tp_model = Transformer(args).double(), Transformer(args).double()
    materialize(full, initial_values(full.init_full, 0), torch.device("cpu"))
    par = parallelize(tp_model, groups, cfg, torch.device("cpu"), Tracer(False))
    return full, par, groups


def assert_grads_are_blocks(full_module, tp_module, plan, prefix):
    """Every parameter gradient of the TP module equals its block of the full module's."""
    from parallel.sharding import local_block

    for name, p in tp_module.named_parameters():
        key = f"{prefix}.{name}" if prefix else name
        expected = full_module.get_parameter(name).grad[local_block(plan, key, p)]
        torch.testing.assert_close(p.grad, expected, **TOL, msg=f"gradient of {key}")


def _primitives(rank, world, sp, kv_heads):
    from parallel.collectives import all_reduce_grads

    full, par, groups = build(rank, world, sp, [f"model.n_kv_heads={kv_heads}"])
    tp_model, tp = par.model, groups["tp"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 64, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 8, 64, generator=g, dtype=torch.float64)
    shard = (lambda t: t.chunk(world, dim=1)[rank]) if sp else (lambda t: t)
    from runtime.model import AttentionInputs, rotary_tables
    rope = AttentionInputs(*rotary_tables(torch.arange(8), 16, 10000.0, torch.float64))

    # Attention and feed-forward regions: column-parallel in, row-parallel out, f/g or SP.
    for attr in ("attention", "feed_forward"):
        full_mod, tp_mod = getattr(full.layers["0"], attr), getattr(tp_model.layers["0"], attr)
        xf, xt = x.clone().requires_grad_(), shard(x).clone().requires_grad_()
        extra = (rope,) if attr == "attention" else ()
        out_f, out_t = full_mod(xf, *extra), tp_mod(xt, *extra)
        torch.testing.assert_close(out_t, shard(out_f), **TOL)
        out_f.backward(grad_out)
        out_t.backward(shard(grad_out))
        torch.testing.assert_close(xt.grad, shard(xf.grad), **TOL)
        all_reduce_grads([p for n, p in tp_mod.named_parameters()
                           if par.plan.partial_grad(f"layers.0.{attr}.{n}")], tp)
        assert_grads_are_blocks(full_mod, tp_mod, par.plan, f"layers.0.{attr}")

    # A norm on sequence shards: its gradient is partial until summed over TP.
    xf, xt = x.clone().requires_grad_(), shard(x).clone().requires_grad_()
    full.layers["0"].attention_norm(xf).backward(grad_out)
    tp_norm = tp_model.layers["0"].attention_norm
    tp_norm(xt).backward(shard(grad_out))
    if sp:
        assert par.plan.partial_grad("layers.0.attention_norm.weight")
        all_reduce_grads([tp_norm.weight], tp)
    torch.testing.assert_close(tp_norm.weight.grad, full.layers["0"].attention_norm.weight.grad, **TOL)

    # Vocabulary-parallel embedding (with SP it leaves sequence shards).
    vocab = full.args.vocab_size
    tokens = torch.randint(0, vocab, (2, 8), generator=g)
    emb_f, emb_t = full.tok_embeddings(tokens), tp_model.tok_embeddings(tokens)
    torch.testing.assert_close(emb_t, shard(emb_f), **TOL)
    emb_f.backward(grad_out)
    emb_t.backward(shard(grad_out))
    assert_grads_are_blocks(full.tok_embeddings, tp_model.tok_embeddings, par.plan, "tok_embeddings")

    # Vocabulary-parallel cross-entropy, with ignored targets; never the full logits.
    logits = torch.randn(2, 8, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 8), generator=g)
    labels[0, :3] = -100
    local = logits.detach().chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss_t = par.loss_fn(local, labels)
    loss_f = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    torch.testing.assert_close(loss_t, loss_f, **TOL)
    loss_f.backward()
    loss_t.backward()
    torch.testing.assert_close(local.grad, logits.grad.chunk(world, dim=-1)[rank], **TOL)
    return True


@pytest.mark.parametrize("world, sp, kv_heads", [
    (2, False, 2), (2, True, 2), (4, False, 4), (4, True, 2),  # kv_heads=2 at tp=4: KV replicated
    (4, False, 2),
])
def test_primitive_layers_equal_one_process(world, sp, kv_heads):
    run_ranks(_primitives, world, args=(sp, kv_heads))


def _whole_model(rank, world, sp):
    full, par, groups = build(rank, world, sp)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (2, 32), generator=g)
    labels = torch.randint(0, 256, (2, 32), generator=g)
    loss_f = F.cross_entropy(full(tokens).flatten(0, 1), labels.flatten(), reduction="sum")
    loss_t = par.loss_fn(par.model(tokens), labels)
    torch.testing.assert_close(loss_t, loss_f, **TOL)
    loss_f.backward()
    loss_t.backward()
    par.finish_grads()
    assert_grads_are_blocks(full, par.model, par.plan, "")
    # The global gradient norm counts sharded pieces once and replicated ones once.
    norm = par.clip_grad_norm_(0.0)
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in full.parameters()))
    torch.testing.assert_close(norm, expected, **TOL)
    return True


@pytest.mark.parametrize("world, sp", [(2, False), (2, True), (4, False), (4, True)])
def test_whole_model_forward_backward_equals_one_process(world, sp):
    run_ranks(_whole_model, world, args=(sp,))


def _state_bytes(rank, world, overrides):
    """Bytes of this rank's parameters, gradients and optimizer state after one real step."""
    from launch.config import compose
    from launch.train import setup
    from torch.distributed.tensor import DTensor

    run = setup(compose([*SMALL, *overrides]))
    run.trainer.train_step(0)  # creates the optimizer state
    run.trainer.forward_backward(run.trainer.loader.step(1), 1.0)  # and gradients (a step frees them)
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    params = list(run.parallel.model.parameters())
    nbytes = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)  # noqa: E731
    optim = [v for p in params for v in run.optimizer.state[p].values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
            "optim": nbytes(optim)}


def test_tp2_dp2_fsdp_holds_at_most_0_3_of_one_process_state_per_rank(tmp_path):
    one = run_ranks(_state_bytes, 1, args=([f"run_dir={tmp_path}/one"],))[0]
    four = run_ranks(_state_bytes, 4, args=(["parallel.tp=2", "train.micro_batch_size=2", f"run_dir={tmp_path}/four"],))
    total = sum(one.values())
    assert one["grads"] == one["params"] and one["optim"] == 2 * one["params"]  # AdamW: m and v
    for rank, got in enumerate(four):
        ratio = sum(got.values()) / total
        print(f"rank {rank}: {got} = {ratio:.3f} of one process {one}")
        assert ratio <= 0.3, (rank, got, one)
