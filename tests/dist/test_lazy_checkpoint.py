"""The lazy checkpoint engine: the checkpoint of step k is the state of step k byte for byte even
though training goes on while it is copied (and is not without `wait()`), retention, time-based
checkpoints agreed by all ranks, and a failed write that moves nothing."""
import json
import time

import torch

from launch.spawn import run_ranks
from runtime.metrics import read_metrics
from tests.training import SMALL, train

# Slow storage: 64 KiB regions through a 128 KiB pool, 15 ms per region, so the copy of the
# ~1.2 MB state waits on the writer (back-pressure) for about a quarter of a second.
SLOW_S, POOL, CHUNK = 0.015, 128 << 10, 64 << 10


def _slow_engine(run_dir, rank, break_wait: bool):
    """Storage slower than training. With `break_wait` (the control) the writer is held until the
    test opens `engine.gate`, so the copy is certainly unfinished when the next steps run."""
    import threading

    from runtime.checkpoint.lazy import LazyCheckpointer

    class SlowStorage(LazyCheckpointer):
        def _write_region(self, *region):
            if not self.gate.wait(timeout=120):
                raise TimeoutError("the test never opened the gate")
            time.sleep(SLOW_S)
            super()._write_region(*region)

    engine = SlowStorage(f"{run_dir}/checkpoints", every=0, rank=rank, timeout_s=60, pool_bytes=POOL,
                         chunk_bytes=CHUNK)
    engine.gate = threading.Event()
    if break_wait:
        engine.wait = lambda: None  # the bug the test must catch
    else:
        engine.gate.set()
    return engine


def _exactness(rank, world, run_dir, break_wait):
    from launch.config import compose
    from launch.train import setup
    from parallel.state import state_blocks
    from runtime.checkpoint.format import load_blocks
    from runtime.checkpoint.sync import owned_blocks

    r = setup(compose([*SMALL, f"run_dir={run_dir}", "checkpoint.every=0"]))
    trainer = r.trainer
    trainer.checkpointer = engine = _slow_engine(run_dir, rank, break_wait)
    trainer.train_step(0)
    blocks = owned_blocks(state_blocks(r.parallel, r.optimizer), rank)
    expected = [b.local.detach().clone() for b in blocks]
    engine.request(1, r.trainer.state(), {"tokens": 0})
    copied_at_return = engine._copying.copied.is_set()
    trainer.train_step(1)  # runs while the copy is in progress; its optimizer step waits
    trainer.train_step(2)
    engine.gate.set()
    engine.close()
    stored = [torch.zeros_like(e) for e in expected]
    holders = [type("B", (), {"key": b.key, "local": s, "full_shape": b.full_shape, "coords": b.coords})()
               for b, s in zip(blocks, stored)]
    load_blocks(engine.step_path(1), holders)
    same = all(torch.equal(e.view(-1).view(torch.uint8), s.view(-1).view(torch.uint8))
               for e, s in zip(expected, stored))
    return {"same": same, "copied_at_return": copied_at_return, "waits": engine.pool.waits,
            "latest": (engine.dir / "latest").read_text().strip()}


def test_the_checkpoint_is_the_state_of_its_step_byte_for_byte(tmp_path):
    for world in (1, 2):
        good = run_ranks(_exactness, world, args=(str(tmp_path / f"good{world}"), False), timeout_s=120)
        assert all(g["same"] for g in good), "the checkpoint differs from the state it was requested for"
        assert all(g["latest"] == "step_00000001" for g in good)
        assert all(g["waits"] > 0 for g in good), "the pool should have applied back-pressure"
        assert not any(g["copied_at_return"] for g in good), "request() must return before the copy is done"
    # Control: without wait(), step 1's optimizer step changes the state mid-copy.
    broken = run_ranks(_exactness, 1, args=(str(tmp_path / "broken"), True), timeout_s=120)
    assert not broken[0]["same"], "the test cannot tell a missing wait() (copy too fast?)"


def test_keep_last_and_time_based_checkpoints(tmp_path):
    run = tmp_path / "keep"
    train(run, ["checkpoint.every=2", "checkpoint.keep_last=2", "train.steps=8"], world_size=2)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000008"]
    timed = tmp_path / "timed"
    # A tiny interval: every step is due by the clock; both ranks must agree on it.
    train(timed, ["checkpoint.every_s=0.001", "train.steps=4"], world_size=2)
    assert sorted(p.name for p in (timed / "checkpoints").glob("step_*")) == [f"step_0000000{i}" for i in range(1, 5)]
    assert json.loads((timed / "checkpoints/step_00000004/trainer.json").read_text())["step"] == 4
    assert [m["step"] for m in read_metrics(timed)] == [1, 2, 3, 4]


def _failing_rank(rank, world, run_dir):
    from launch.config import compose
    from launch.train import setup

    r = setup(compose([*SMALL, f"run_dir={run_dir}", "checkpoint.every=0"]))
    engine = r.trainer.checkpointer
    r.trainer.train_step(0)
    engine.request(1, r.trainer.state(), {"tokens": 0})
    engine.drain()
    if rank == 1:
        engine._write_region = lambda *region: (_ for _ in ()).throw(OSError("disk full (injected)"))
    r.trainer.train_step(1)
    engine.request(2, r.trainer.state(), {"tokens": 0})
    try:
        engine.drain()
    except RuntimeError as e:
        return str(e)
    return None


def test_a_failed_write_on_one_rank_commits_nothing(tmp_path):
    errors = run_ranks(_failing_rank, 2, args=(str(tmp_path),), timeout_s=120)
    # Every rank raises the same error, naming the rank, its reason and the directory.
    assert errors[0] == errors[1] and "rank 1: disk full (injected)" in errors[0]
    assert f"could not write the checkpoint of step 2 into {tmp_path}/checkpoints/step_00000002" in errors[0]
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "checkpoints/step_00000002").exists(), "the partial checkpoint must be removed"


def _dcp_exactness(rank, world, run_dir):
    from launch.config import compose
    from launch.train import setup
    from parallel.state import state_blocks
    from runtime.checkpoint.dcp_format import load_dcp_blocks
    from runtime.checkpoint.sync import owned_blocks

    r = setup(compose([*SMALL, f"run_dir={run_dir}", "checkpoint.every=0", "checkpoint.engine=dcp_async"]))
    engine = r.trainer.checkpointer
    r.trainer.train_step(0)
    blocks = owned_blocks(state_blocks(r.parallel, r.optimizer), rank)
    expected = [b.local.detach().clone() for b in blocks]
    engine.request(1, r.trainer.state(), {"tokens": 0})
    r.trainer.train_step(1)
    r.trainer.train_step(2)
    engine.close()
    stored = [torch.zeros_like(e) for e in expected]
    holders = [type("B", (), {"key": b.key, "local": s, "full_shape": b.full_shape, "coords": b.coords})()
               for b, s in zip(blocks, stored)]
    load_dcp_blocks(engine.step_path(1), holders)
    return all(torch.equal(e, s) for e, s in zip(expected, stored))


def test_dcp_async_baseline_is_exact_too(tmp_path):
    assert all(run_ranks(_dcp_exactness, 2, args=(str(tmp_path),), timeout_s=120))
