"""A rehearsal (launch/rehearse.py: fake tensors over a fake process group, in this one process)
gives every rank the parameter, gradient and optimizer-state bytes that rank of the real run
holds after the step's forward and backward (both counted by parallel/footprint.py), and the
same collective calls and bytes per group and kind (parallel/traffic.py); a
job of thousands of ranks rehearses in seconds, and bad input stops it as a launch would."""
import dataclasses

import pytest
import torch

from launch.rehearse import Options, RehearsalError, main, rehearse
from launch.spawn import run_ranks
from tests.training import SMALL

LAYOUTS = {
    "tp2-sp-dp2-fsdp": (4, ["parallel.tp=2", "parallel.sp=true", "train.micro_batch_size=2"]),
    "cp2-dp2-fsdp": (4, ["parallel.cp=2", "train.micro_batch_size=2"]),
    # the interleaved schedule's whole step on each rank, its embedding group (tied head)
    "pp2-vpp2-tp2-tied": (4, ["model.n_layers=4", "parallel.pp=2", "parallel.vpp=2", "parallel.tp=2",
                              "parallel.schedule=interleaved_1f1b", "model.tie_embeddings=true",
                              "train.micro_batch_size=2"]),
    # latent attention's replicated and split projections, with experts sharded over EDP = 2
    "deepseek-tp2-sp-ep2-dp2": (4, ["model=tiny_deepseek", "model.n_kv_heads=4", "model.moe.expert_ffn_dim=48",
                                    "parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=2",
                                    "train.micro_batch_size=2"]),
    # experts folded over tp × dp (ep4) with sequence parallelism and two accumulated microbatches
    "moe-tp2-sp-ep4-folding": (4, ["model=tiny_moe", "parallel.tp=2", "parallel.sp=true", "parallel.ep=4",
                                   "parallel.etp=1"]),
    # zero-bubble's deferred weight gradients with recomputed layers, under tensor parallelism
    "pp2-zero-bubble-ac-tp2": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.schedule=zero_bubble",
                                   "parallel.activation_checkpoint=full", "train.micro_batch_size=2"]),
    # FSSDP's sparse all-gathers of the experts a rank's tokens need
    "moe-fssdp-dp4": (4, ["model=tiny_moe", "parallel.moe_backend=fssdp", "parallel.ep=4",
                              "train.micro_batch_size=2"]),
    # HSDP: sharded over 2, replicated over 2 (a 2-D mesh in every rank's fake world)
    "hsdp-2x2": (4, ["parallel.dp_replicate=2", "train.micro_batch_size=2"]),
    # DistributedDataParallel's bucketed all-reduces (its hook reads a fake collective's future)
    "pp2-ddp2-zero-bubble": (4, ["parallel.pp=2", "parallel.dp_impl=ddp", "parallel.schedule=zero_bubble",
                                 "train.micro_batch_size=2"]),
    # DeepSeek's pipeline with multi-token prediction on the last stage, ep2 over dp
    "deepseek-pp2-mtp-ep2": (4, ["model=tiny_deepseek", "model.n_kv_heads=4", "model.mtp_depth=1",
                                 "parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=2"]),
}
DEFAULT = ("tp2-sp-dp2-fsdp", "deepseek-tp2-sp-ep2-dp2")  # the others: QUINTET_SLOW=1


def _real_rank(rank: int, world_size: int, overrides: list[str]) -> dict:
    from launch.config import compose
    from launch.train import setup
    from launch.rehearse import run_step
    from parallel.footprint import LiveBytes, state_bytes
    from parallel.state import state_blocks
    from parallel.traffic import CollectiveCounter
    from runtime.checkpoint.sync import owned_blocks

    run = setup(compose(overrides))
    par = run.parallel
    batches = par.local_batches(run.trainer.loader.step(0))
    before = state_bytes(par.parameters(), run.optimizer)
    # The step the rehearsal runs, on real data, its live bytes counted the same way.
    with CollectiveCounter(run.groups) as counter, LiveBytes(before["parameters"] + before["optimizer"]) as live:
        state = run_step(par, run.optimizer, run.cfg, batches, live)
    # The checkpoint's owners as the layout says (as the engines take them), and as the ranks
    # would agree on every one of them by exchanging every block's coordinates.
    blocks = state_blocks(par, run.optimizer)
    written = owned_blocks(blocks, rank)
    agreed = owned_blocks([dataclasses.replace(b, owner=None) for b in blocks], rank)
    return {**state, "peak": live.peak, "collectives": counter.table,
            "checkpoint": {"bytes": sum(b.local.numel() * b.local.element_size() for b in written),
                           "blocks": len(written)},
            "owners": [(b.key, b.coords()) for b in written], "agreed_owners": [(b.key, b.coords()) for b in agreed],
            "open": sorted({b.key for b in blocks if b.owner is None})}


@pytest.mark.parametrize("layout", [pytest.param(n, marks=[] if n in DEFAULT else [pytest.mark.slow]) for n in LAYOUTS])
def test_rehearsed_ranks_are_the_real_ranks(layout, tmp_path):
    """State bytes and collectives equal; the peak of live bytes within 10% (rank by rank); the
    checkpoint's owners from the plan are those the engines agree on, and the rehearsal writes as
    many bytes and blocks. MoE layouts route with forced balance in both, so the real run's token
    counts are the rehearsal's."""
    world, overrides = LAYOUTS[layout]
    balance = ["model.moe.force_balance=true"] if "moe" in layout or "deepseek" in layout else []
    common = [*SMALL, *overrides, *balance, "checkpoint.enabled=false"]
    real = run_ranks(_real_rank, world, args=([*common, f"run_dir={tmp_path}"],), timeout_s=240)
    job = rehearse(Options(world, list(range(world)), 80.0, common))
    for rank, (r, f) in enumerate(zip(real, job["ranks"])):
        assert f["rank"] == rank
        assert {k: f[k] for k in ("parameters", "gradients", "optimizer", "collectives")} == \
            {k: r[k] for k in ("parameters", "gradients", "optimizer", "collectives")}, (rank, r, f)
        assert abs(f["peak"] - r["peak"]) <= 0.1 * r["peak"], (rank, r["peak"], f["peak"], f["peak_phase"])
        assert r["owners"] == r["agreed_owners"], rank
        # Only FSSDP's experts (owners re-planned per EP group) are left to the ranks to agree on.
        assert all(".experts." in key for key in r["open"]) and bool(r["open"]) == ("fssdp" in layout), r["open"]
        assert {k: f["checkpoint"][k] for k in ("bytes", "blocks")} == r["checkpoint"], rank


def _layer(dim, heads, kv_heads, ffn):  # attention (heads of 128) and a SwiGLU; its two norms apart
    return 2 * dim * heads * 128 + 2 * dim * kv_heads * 128 + 3 * dim * ffn


MLA_LAYER = (7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168
             + 2 * 7168)  # DeepSeek-V3's latent attention with its norms, and the layer's two norms
# Published layouts (configs/parallel/): each middle-stage rank's parameters in closed form — what a
# layer holds over the degrees that split it — in fp32; gradients the same, AdamW twice that.
PUBLISHED = {
    # 8 layers of 126; each matrix split by tp8, then everything by FSDP over dp128
    "llama3_405b_8k": (16384, "llama3_405b", 8192, 8 * (_layer(16384, 128, 8, 53248) / 8 + 2 * 16384) / 128),
    # the same over dp8 × cp16 (FSDP shards over both)
    "llama3_405b_128k": (16384, "llama3_405b", 8192, 8 * (_layer(16384, 128, 8, 53248) / 8 + 2 * 16384) / 128),
    # 4 MoE layers: attention, router, shared expert over dp128; 4 of the 256 experts over edp2
    "deepseek_v3_2048": (2048, "deepseek_v3", 1024, 4 * ((MLA_LAYER + 256 * 7168 + 3 * 7168 * 2048) / 128
                                                         + 4 * 3 * 7168 * 2048 / 2)),
    # 7 layers: attention by tp2 and dp8 (norms and router by dp8); one of the 8 experts, whole: FSDP2
    # splits the stacked experts' dim 0 (1 here) over edp2, so the first EDP rank holds it and the second none
    "mixtral_8x22b_folding": (128, "mixtral_8x22b", 64, 7 * ((2 * 6144 * 6144 + 2 * 6144 * 1024) / 16
                                                            + (2 * 6144 + 8 * 6144) / 8 + 3 * 6144 * 16384)),
}


@pytest.mark.parametrize("layout", PUBLISHED)
def test_a_published_layout_rehearses_and_its_state_is_the_closed_form(layout, capsys):
    world, model, rank, parameters = PUBLISHED[layout]
    main([f"model={model}", f"parallel={layout}", f"world_size={world}", f"rehearse.ranks=[{rank}]", "--no-step"])
    import json
    [report] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ranks"]
    expected = {"parameters": 4 * parameters, "gradients": 4 * parameters, "optimizer": 8 * parameters}
    for k, v in expected.items():
        assert abs(report[k] - v) <= 0.02 * v, (k, report[k], v)
    # The first rank of its stage is the lowest holder of everything it holds: its shard has it all.
    assert abs(report["checkpoint"]["bytes"] - 12 * parameters) <= 0.02 * 12 * parameters


@pytest.mark.parametrize("argv, message", [
    (["model=tiny_moe", "world_size=2048", "parallel.ep=3"], "model.moe.num_experts=8 is not divisible by parallel.ep=3"),
    (["model=llama3_405b", "world_size=16300", "parallel.tp=8", "parallel.pp=16"],
     "is not divisible by"),
    (["model=llama3_405b", "world_size=16384", "parallel.tp=8", "parallel.pp=4", "parallel.pp_layers=[63,0,0,63]"],
     "pipeline stages [1, 2] would hold no layer"),
    (["model=tiny", "world_size=8", "--device-memory", "0"], "--device-memory 0 GB > 0"),
])
def test_bad_input_at_scale_stops_with_the_launchs_message(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_layout_that_does_not_fit_is_named_exit_3(capsys):
    with pytest.raises(SystemExit) as stop:
        main([*SMALL, "world_size=4", "parallel.pp=2", "--no-step", "--device-memory", "0.0001"])
    assert stop.value.code == 3
    out, err = capsys.readouterr()
    assert '"fits": false' in out.splitlines()[-1]
    assert "does not fit --device-memory 0.0001 GB: rank 0 needs 0.00" in err and "; rank 2 needs" in err


def test_a_rank_that_raises_is_named_with_its_phase(monkeypatch):
    import launch.rehearse as rehearsal

    def broken(*args, **kwargs):
        raise NotImplementedError("an unsupported combination")

    monkeypatch.setattr(rehearsal, "parallelize", broken)
    with pytest.raises(RehearsalError, match="rank 3: parallelize: NotImplementedError: an unsupported combination"):
        rehearse(Options(4, [3], 80.0, [*SMALL, "parallel.tp=2"]))
    assert not torch.distributed.is_initialized()
    import parallel.parallelize as parallelizing

    def apply_broken(model, groups, cfg):
        raise NotImplementedError("this strategy with that one")

    monkeypatch.setattr(rehearsal, "parallelize", parallelizing.parallelize)
    monkeypatch.setattr(parallelizing, "STRATEGIES", [*parallelizing.STRATEGIES, apply_broken])
    with pytest.raises(RehearsalError, match=r"rank 1: parallelize \(apply_broken\): NotImplementedError: this"):
        rehearse(Options(4, [1], 80.0, [*SMALL, "parallel.tp=2"]))


def test_a_bf16_pipeline_over_fsdp_rehearses():
    """FSDP2's bf16 policy makes a stage's output bf16: the pipeline's boundary carries bf16 (a
    real run of this layout once stopped at its first send, which this rehearsal found)."""
    job = rehearse(Options(4, [0, 2], 80.0, [*SMALL, "parallel.pp=2", "train.dtype=bfloat16",
                                             "train.micro_batch_size=2", "checkpoint.enabled=false"]))
    assert [r["rank"] for r in job["ranks"]] == [0, 2] and job["pipeline_bubble"] > 0
    sent = job["ranks"][0]["collectives"]["pp/model"]["isend"]  # (pp is the model's whole group here)
    assert sent["bytes"] == sent["calls"] * 2 * 32 * 64 * 2  # [micro_batch, seq_len, dim] in bf16


def test_a_long_pipeline_step_is_rehearsed_from_its_first_microbatches(monkeypatch):
    """16 microbatches through 1F1B over pp=4: the rehearsal runs one more than a rank holds at
    once (4 at least), and adds microbatch 1's collectives for each one it skipped; the figures
    are those of running all 16."""
    import launch.rehearse as rehearsal

    overrides = [*SMALL, "model.n_layers=4", "parallel.pp=4", "train.micro_batch_size=1", "train.global_batch_size=16",
                 "checkpoint.enabled=false"]
    short = rehearse(Options(4, [0, 1, 3], 80.0, overrides))
    assert [r["microbatches_run"] for r in short["ranks"]] == [5, 4, 4]
    monkeypatch.setattr(rehearsal, "rehearsed_microbatches", lambda cfg, topo, pp_rank: rehearsal.microbatches(cfg, topo))
    full = rehearse(Options(4, [0, 1, 3], 80.0, overrides))
    for s, f in zip(short["ranks"], full["ranks"]):
        assert f["microbatches_run"] == 16
        assert {k: s[k] for k in ("parameters", "gradients", "optimizer", "peak", "collectives")} == \
            {k: f[k] for k in ("parameters", "gradients", "optimizer", "peak", "collectives")}
