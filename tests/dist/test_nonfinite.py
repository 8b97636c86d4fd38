"""Non-finite guard: a step whose gradient is NaN is skipped and training goes on; more than
train.skip_nonfinite in a row stop the run with a message naming the step, and the last
checkpoint is finite."""
import json

import torch

from launch.spawn import run_ranks
from runtime.metrics import read_metrics
from tests.training import SMALL


def _poisoned_run(rank, world, run_dir, nan_steps, overrides):
    """Train with a NaN written into one gradient (rank 0's shard) at each step of `nan_steps`."""
    from launch.config import compose
    from launch.train import setup
    from runtime.trainer import NonFiniteError

    r = setup(compose([*SMALL, f"run_dir={run_dir}", *overrides]))
    train_step, finish_grads, step = r.trainer.train_step, r.parallel.finish_grads, [0]

    def counted(s):
        step[0] = s
        return train_step(s)

    def poisoned():  # the gradients are complete; a NaN in one now reaches the global norm
        finish_grads()
        if step[0] + 1 in nan_steps and rank == 0:
            grad = next(p.grad for p in r.parallel.parameters() if p.grad is not None)
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")

    r.trainer.train_step, r.parallel.finish_grads = counted, poisoned
    try:
        r.trainer.fit(0)
    except NonFiniteError as e:
        return str(e)
    return None


def test_a_nan_gradient_is_skipped_and_training_goes_on(tmp_path):
    errors = run_ranks(_poisoned_run, 2, args=(str(tmp_path), {5}, ["train.skip_nonfinite=1"]), timeout_s=120)
    assert errors == [None, None]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 21))
    assert [r["step"] for r in records if r.get("skipped")] == [5]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_too_many_in_a_row_stop_the_run_and_checkpoints_stay_finite(tmp_path):
    overrides = ["train.skip_nonfinite=2", "checkpoint.every=2"]
    errors = run_ranks(_poisoned_run, 2, args=(str(tmp_path), {5, 6, 7}, overrides), timeout_s=120)
    for e in errors:
        assert e is not None and e.startswith("step 7:") and "exceed train.skip_nonfinite=2" in e
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"  # steps 5, 6 skipped: still finite
    for index in (ckpt / "step_00000006").glob("shard-*.json"):
        data = index.with_suffix(".bin").read_bytes()
        for e in json.loads(index.read_text())["entries"]:
            t = torch.frombuffer(bytearray(data[e["offset"]:e["offset"] + e["nbytes"]]), dtype=getattr(torch, e["dtype"]))
            assert torch.isfinite(t).all(), f"{e['key']} is not finite in the checkpoint"
