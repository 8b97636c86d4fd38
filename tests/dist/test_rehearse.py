"""A rehearsal (launch/rehearse.py: fake tensors over a fake process group, in this one process)
gives every rank the parameter, gradient and optimizer-state bytes that rank of the real run
holds after the step's forward and backward (both counted by parallel/footprint.py), and the
same collective calls and bytes per group and kind (parallel/traffic.py); a
job of thousands of ranks rehearses in seconds, and bad input stops it as a launch would."""
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
}


def _real_rank(rank: int, world_size: int, overrides: list[str]) -> dict:
    from launch.config import compose
    from launch.train import setup
    from launch.rehearse import run_step
    from parallel.footprint import state_bytes
    from parallel.traffic import CollectiveCounter

    run = setup(compose(overrides))
    par = run.parallel
    batch = par.local_batches(run.trainer.loader.step(0))[0]
    with CollectiveCounter(run.groups) as counter:  # the step the rehearsal runs, on real data
        run_step(par, run.cfg, run.groups.topology, batch)
    return {**state_bytes(par.parameters(), run.optimizer), "collectives": counter.table}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rehearsed_state_bytes_are_the_real_ranks(layout, tmp_path):
    world, overrides = LAYOUTS[layout]
    common = [*SMALL, *overrides, "checkpoint.enabled=false"]
    real = run_ranks(_real_rank, world, args=([*common, f"run_dir={tmp_path}"],), timeout_s=180)
    rehearsed = rehearse(Options(world, list(range(world)), 80.0, common))
    for rank, (r, f) in enumerate(zip(real, rehearsed)):
        stepped = f["step"].startswith(("one microbatch", "the pipeline schedule"))
        assert f["rank"] == rank and stepped == (layout != "deepseek-tp2-sp-ep2-dp2"), f["step"]
        if not stepped:  # no step rehearsed: the state alone
            r = {k: v for k, v in r.items() if k != "collectives"}
        assert {k: f[k] for k in r} == r, (rank, r, f)


def test_a_405b_job_of_16384_ranks_rehearses_and_its_state_is_the_closed_form(capsys):
    """Llama 3 405B as Meta trained it at 8K context (tp8 × pp16 × dp128, FSDP): each rank holds
    parameters / (tp · pp · dp) of the blocks it has (the norms whole), in fp32, and AdamW's
    two moments of the same."""
    main(["model=llama3_405b", "world_size=16384", "parallel.tp=8", "parallel.pp=16", "parallel.sp=true",
          "parallel.pp_layers=[7,8,8,8,8,8,8,8,8,8,8,8,8,8,8,7]", "train.seq_len=8192", "train.micro_batch_size=1",
          "train.global_batch_size=2048", "rehearse.ranks=[8192]"])
    import json
    [report] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ranks"]
    layer = 2 * 16384 * 16384 + 2 * 16384 * 1024 + 3 * 16384 * 53248  # wq wo (128 heads of 128), wk wv (8), MLP
    expected = 8 * (layer / (8 * 128) + 2 * 16384 / 128) * 4  # 8 middle-stage layers; norms split only by FSDP
    assert abs(report["parameters"] - expected) <= 0.02 * expected
    assert report["optimizer"] >= 2 * report["parameters"] and report["fits"]


def test_bad_input_at_scale_stops_with_the_launchs_message(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["model=tiny_moe", "world_size=2048", "parallel.ep=3"])
    assert stop.value.code == 2
    assert "model.moe.num_experts=8 is not divisible by parallel.ep=3" in capsys.readouterr().err


def test_a_rank_that_raises_is_named_with_its_phase(monkeypatch):
    import launch.rehearse as rehearsal

    def broken(*args, **kwargs):
        raise NotImplementedError("an unsupported combination")

    monkeypatch.setattr(rehearsal, "parallelize", broken)
    with pytest.raises(RehearsalError, match="rank 3: parallelize: NotImplementedError: an unsupported combination"):
        rehearse(Options(4, [3], 80.0, [*SMALL, "parallel.tp=2"]))
    assert not torch.distributed.is_initialized()
    with pytest.raises(RehearsalError, match="rank 0: parallelize: parallel.dp_impl=ddp is not rehearsed"):
        rehearse(Options(2, [0], 80.0, [*SMALL, "parallel.dp_impl=ddp"]))
