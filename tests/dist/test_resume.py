"""Resume from a checkpoint: the steps after it equal the uninterrupted run, and a checkpoint
saved in one data-parallel layout resumes in another."""
import json
import shutil

import pytest

from runtime.metrics import read_metrics
from tests.training import assert_same_losses, train

CKPT = ["checkpoint.every=5"]


@pytest.mark.parametrize("world, impl", [(1, "fsdp"), (2, "fsdp"), (2, "ddp")])
def test_resume_is_bit_exact(tmp_path, world, impl):
    layout = [f"parallel.dp_impl={impl}"]
    whole = train(tmp_path / "whole", CKPT + layout, world_size=world)
    first = train(tmp_path / "split", CKPT + layout + ["train.stop_at_step=10"], world_size=world)
    assert [r["step"] for r in first] == list(range(1, 11))
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step_00000010"
    second = train(tmp_path / "split", CKPT + layout, world_size=world)
    assert [r["step"] for r in second] == list(range(1, 21)), "a step is missing or repeated"
    assert [r["loss"] for r in second] == [r["loss"] for r in whole]
    assert [r["grad_norm"] for r in second] == [r["grad_norm"] for r in whole]
    meta = json.loads((tmp_path / "split/checkpoints/step_00000020/trainer.json").read_text())
    assert meta["step"] == 20


def test_checkpoint_of_two_fsdp_ranks_resumes_in_one_process(tmp_path):
    whole = train(tmp_path / "whole", CKPT)
    train(tmp_path / "moved", CKPT + ["train.stop_at_step=10"], world_size=2)
    resumed = train(tmp_path / "moved", CKPT, world_size=1)
    assert_same_losses(whole, resumed, rtol=1e-5)


def test_a_stale_metrics_tail_is_replaced_not_repeated(tmp_path):
    """A run that died after logging step 12 but saving step 10 rewrites steps 11-12 once."""
    train(tmp_path, CKPT + ["train.stop_at_step=10"])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        for step in (11, 12):
            f.write(json.dumps({"step": step, "loss": -1.0}) + "\n")
    records = train(tmp_path, CKPT)
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all(r["loss"] > 0 for r in records)
    assert read_metrics(tmp_path) == records


def test_moe_checkpoints_resume_exactly_and_reshard_expert_parallelism(tmp_path):
    """The routing bias (aux-loss-free balancing) is saved too; ep=4 resumes as ep=2."""
    moe = ["model=tiny_moe", "model.moe.expert_ffn_dim=48", "model.moe.bias_update_rate=0.01",
           "train.micro_batch_size=2"]
    whole = train(tmp_path / "whole", CKPT + moe + ["parallel.ep=4"], world_size=4)
    train(tmp_path / "split", CKPT + moe + ["parallel.ep=4", "train.stop_at_step=10"], world_size=4)
    second = train(tmp_path / "split", CKPT + moe + ["parallel.ep=4"], world_size=4)
    assert [r["total_loss"] for r in second] == [r["total_loss"] for r in whole]
    train(tmp_path / "moved", CKPT + moe + ["parallel.ep=4", "train.stop_at_step=10"], world_size=4)
    moved = train(tmp_path / "moved", CKPT + moe + ["parallel.ep=2"], world_size=4)
    assert_same_losses([{**r, "loss": r["total_loss"]} for r in whole],
                       [{**r, "loss": r["total_loss"]} for r in moved], rtol=1e-5)


@pytest.mark.parametrize("engine", ["sync", "dcp_async"])
def test_every_engine_resumes_exactly_and_across_engines_and_layouts(tmp_path, engine):
    """Two ranks stop after step 10 with `engine`; resuming with the lazy engine in one process
    gives the uninterrupted run's steps 11-20 (the formats load into any layout and engine)."""
    whole = train(tmp_path / "whole", CKPT)
    first = train(tmp_path / "split", CKPT + [f"checkpoint.engine={engine}", "train.stop_at_step=10",
                                             "parallel.tp=2"], world_size=2)
    assert [r["step"] for r in first] == list(range(1, 11))
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step_00000010"
    second = train(tmp_path / "split", CKPT + ["checkpoint.engine=lazy"])
    assert [r["step"] for r in second] == list(range(1, 21))
    assert_same_losses(whole[10:], second[10:], rtol=1e-6)

def test_a_3d_checkpoint_resumes_exactly_and_in_other_layouts(tmp_path):
    """Saved with tp=2 (sequence-parallel) × pp=2 × dp=2 after step 4, every rank's TP slices and
    FSDP shards stored: resuming it in the same layout gives the uninterrupted run's steps 5-8
    (1e-6), and resuming it with dp=8, tp=4 × dp=2 and pp=4 × dp=2 gives the one-process run's
    (1e-5)."""
    ckpt = ["checkpoint.every=4", "train.steps=8", "model.n_layers=4", "train.micro_batch_size=1"]
    layout = ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2"]
    reference = train(tmp_path / "one", ckpt)
    whole = train(tmp_path / "whole", ckpt + layout, world_size=8)
    train(tmp_path / "split", ckpt + layout + ["train.stop_at_step=4"], world_size=8)
    saved = tmp_path / "split/checkpoints"
    shards = sorted(p.name for p in (saved / "step_00000004").glob("shard-*.bin"))
    assert shards == [f"shard-{r:05d}.bin" for r in range(8)]
    for name in ("dp8", "tp4", "pp4"):
        shutil.copytree(saved, tmp_path / name / "checkpoints")
    second = train(tmp_path / "split", ckpt + layout, world_size=8)
    assert [r["step"] for r in second] == list(range(1, 9))
    assert_same_losses(whole[4:], second[4:], rtol=1e-6)
    for name, other in (("dp8", []), ("tp4", ["parallel.tp=4"]), ("pp4", ["parallel.pp=4"])):
        moved = train(tmp_path / name, ckpt + other, world_size=8)
        assert [r["step"] for r in moved] == [5, 6, 7, 8], name
        assert_same_losses(reference[4:], moved, rtol=1e-5)


def test_a_padded_vocabulary_moves_between_tensor_parallel_sizes(tmp_path):
    """250 ids are 384 rows at tp=3 (the last rank holds only padding) and 256 at tp=2: a
    checkpoint holds the 250 real rows, so tp=3's resumes at tp=2 as the one-process run goes on,
    and its export has 250 rows."""
    from launch.export import export
    from safetensors.torch import load_file

    model = ["model.vocab_size=250", "model.pad_vocab_to_multiple_of=64", "model.n_heads=6", "model.n_kv_heads=6",
             "model.dim=96"]
    whole = train(tmp_path / "whole", CKPT + model)
    train(tmp_path / "split", CKPT + model + ["parallel.tp=3", "train.stop_at_step=10"], world_size=3)
    [files] = [export(tmp_path / "split", tmp_path / "hf")]
    assert load_file(files[0])["model.embed_tokens.weight"].shape == (250, 96)
    moved = train(tmp_path / "split", CKPT + model + ["parallel.tp=2"], world_size=2)
    assert [r["step"] for r in moved] == list(range(1, 21))
    assert_same_losses(whole[10:], moved[10:], rtol=1e-5)
