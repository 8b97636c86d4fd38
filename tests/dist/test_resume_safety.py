"""Resuming only what verifies, and only into the model it was written for: a checkpoint of
another model is refused naming what differs (never loaded in part); a corrupt or partial newest
checkpoint is skipped for the newest one that verifies (checkpoint.fallback, the default), or
stops the run naming the file; every rank reaches the same verdict."""
import json
import shutil

import pytest

from launch.spawn import run_ranks
from runtime.metrics import read_events
from tests.training import SMALL, train

SAVED = ["train.steps=8", "checkpoint.every=4"]  # step_00000004 and step_00000008, one shard per rank


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run = tmp_path_factory.mktemp("saved")
    train(run, SAVED, world_size=2)
    return run


def _resume(rank, world, run_dir, overrides):
    from launch.config import compose
    from launch.train import setup
    from runtime.checkpoint import CheckpointError

    try:
        return setup(compose([*SMALL, *SAVED, f"run_dir={run_dir}", *overrides])).start_step
    except CheckpointError as e:
        return f"{type(e).__name__}: {e}"


def _copy(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved, run)  # its job.lock files come along unheld: a lock is the holder's flock, not the file
    return run


def test_a_checkpoint_of_another_model_is_refused_naming_what_differs(saved, tmp_path):
    run = _copy(saved, tmp_path)
    for overrides, differs in ((["model.n_layers=1"], "model.n_layers: 2 there, 1 here"),
                               (["model.ffn_dim=128"], "model.ffn_dim: 96 there, 128 here")):
        errors = run_ranks(_resume, 2, args=(run, overrides))
        assert errors[0] == errors[1] and errors[0].startswith("CheckpointMismatch: "), errors
        assert f"{run}/checkpoints/step_00000008 was written for another model ({differs}" in errors[0]
        assert "train this model in a new run_dir" in errors[0]
    errors = run_ranks(_resume, 2, args=(run, ["model.n_layers=1"]))
    assert "it holds tensors this model lacks: buffer" not in errors[0] and "layers.1.attention.wq.weight" in errors[0]
    # Nothing changed on disk: the run's checkpoints and records are as they were.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["job.lock", "latest", "step_00000004",
                                                                        "step_00000008"]
    assert (run / "config.yaml").read_text() == (saved / "config.yaml").read_text()


def test_settings_that_change_no_tensor_may_change_on_resume(saved, tmp_path):
    run = _copy(saved, tmp_path)
    assert run_ranks(_resume, 2, args=(run, ["model.rope_theta=500000", "model.residual=ladder"])) == [8, 8]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    # name: (damage to step_00000008, the file the message names, what it says)
    "truncated shard": (lambda d: _truncate(d / "shard-00001.bin"), "shard-00001.bin", "checksum mismatch or short read"),
    "flipped bytes": (lambda d: _flip(d / "shard-00000.bin"), "shard-00000.bin", "checksum mismatch"),
    "deleted index": (lambda d: (d / "shard-00001.json").unlink(), "shard-00001.json", "is missing"),
    "truncated index": (lambda d: _truncate(d / "shard-00000.json"), "shard-00000.json", "does not match the checksum"),
    "missing trainer.json": (lambda d: (d / "trainer.json").unlink(), "step_00000008", "has no trainer.json"),
    "garbled trainer.json": (lambda d: (d / "trainer.json").write_text('{"step": '), "trainer.json", "is not valid JSON"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupt_newest_checkpoint_is_skipped_for_the_newest_that_verifies(saved, tmp_path, case):
    damage, file, problem = CORRUPTIONS[case]
    run = _copy(saved, tmp_path)
    damage(run / "checkpoints/step_00000008")
    assert run_ranks(_resume, 2, args=(run, [])) == [4, 4]
    (resumed,) = read_events(run, "resume")
    (skipped,) = resumed["skipped"]
    assert skipped["checkpoint"] == "step_00000008" and file in skipped["why"] and problem in skipped["why"], skipped
    # Without fallback the run stops on every rank with the same message naming the file.
    run = _copy(saved, tmp_path / "strict")
    damage(run / "checkpoints/step_00000008")
    errors = run_ranks(_resume, 2, args=(run, ["checkpoint.fallback=false"]))
    assert errors[0] == errors[1] and file in errors[0] and problem in errors[0], errors


def test_when_no_checkpoint_verifies_the_run_stops_naming_each(saved, tmp_path):
    run = _copy(saved, tmp_path)
    _flip(run / "checkpoints/step_00000008/shard-00000.bin")
    (run / "checkpoints/step_00000004/shard-00000.json").unlink()
    errors = run_ranks(_resume, 2, args=(run, []))
    assert errors[0] == errors[1] and f"no checkpoint in {run}/checkpoints verifies (step_00000008: " in errors[0]
    assert "step_00000004: " in errors[0] and "shard-00000.json is missing" in errors[0]


def test_a_latest_marker_pointing_outside_is_not_followed(saved, tmp_path):
    run = _copy(saved, tmp_path)
    (run / "checkpoints/latest").write_text("../../../etc\n")
    assert run_ranks(_resume, 2, args=(run, [])) == [8, 8]  # the newest committed checkpoint instead
    (resumed,) = read_events(run, "resume")
    assert "which is not a step directory" in resumed["skipped"][0]["why"]
    assert json.loads((run / "checkpoints/step_00000008/trainer.json").read_text())["step"] == 8
