"""DeepSpeed with quintet's lazy checkpoint engine (chosen by configuration): ZeRO stage 1 and 2
on two CPU ranks save through it while training goes on, and a fresh engine loads exactly the
state of the step it was saved at."""
import time

import pytest

from launch.spawn import run_ranks

DS_ENV = {"DS_ACCELERATOR": "cpu"}


def _ds_rank(rank, world, stage, save_dir):
    import importlib

    import torch

    from runtime.checkpoint.deepspeed_engine import QuintetCheckpointEngine, initialize
    from runtime.checkpoint.tree import MAGIC, flatten

    # DeepSpeed's CPU accelerator JIT-compiles two C++ ops on first use: a shared-memory all-reduce
    # (gloo does that job here) and its fused Adam (torch's AdamW, given below, does that one).
    # Together they cost ~55 s of a fresh machine's 2 cores and have nothing to do with checkpoints.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (deepspeed.comm.torch is torch)

    def engine(seed):
        torch.manual_seed(seed)
        # ~1M parameters: 4 MB per state through a 1 MB pool, written slowly (below), so the copy
        # is still running when the next optimizer step comes and commit() must wait for it.
        model = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
                  "zero_optimization": {"stage": stage},
                  "quintet_checkpoint": {"enabled": True, "pool_mb": 1, "chunk_mb": 1}}
        eng, *_ = initialize(model=model, optimizer=optimizer, config=config)
        assert isinstance(eng.checkpoint_engine, QuintetCheckpointEngine)
        writer = eng.checkpoint_engine.writer
        write = writer._write_region
        writer._write_region = lambda *region: (time.sleep(0.02), write(*region))
        return eng

    def train(eng, steps):
        for _ in range(steps):
            x = torch.randn(4, 16, generator=gen)
            eng.backward(eng(x).pow(2).mean() * 1e3)
            eng.step()

    def snapshot(eng):
        _, tensors = flatten({"module": eng.module.state_dict(), "optim": eng.optimizer.state_dict()})
        return [t.detach().clone() for t in tensors]

    gen = torch.Generator().manual_seed(rank)
    eng = engine(0)
    train(eng, 3)
    saved = snapshot(eng)
    eng.save_checkpoint(save_dir, tag="step3")
    train(eng, 3)  # the copy runs behind these; their optimizer steps commit it first
    moved = snapshot(eng)
    eng.destroy()  # DeepSpeed's own teardown drains the engine: `latest` is written by then
    files = sorted(p.name for p in (save_dir / "step3").iterdir())
    not_pickles = all((save_dir / "step3" / f).read_bytes().endswith(MAGIC) for f in files)

    fresh = engine(1)
    path, _ = fresh.load_checkpoint(save_dir)
    loaded = snapshot(fresh)
    return {"files": files, "not_pickles": not_pickles, "latest": (save_dir / "latest").read_text(),
            "path": path, "equal": len(loaded) == len(saved) and all(torch.equal(a, b) for a, b in zip(saved, loaded)),
            "moved": any(not torch.equal(a, b) for a, b in zip(saved, moved))}


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_saves_and_loads_through_the_lazy_engine(tmp_path, stage):
    results = run_ranks(_ds_rank, 2, args=(stage, tmp_path), timeout_s=180, env=DS_ENV)
    for r in results:
        assert r["latest"] == "step3" and "/step3/" in r["path"]
        assert r["files"] == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                              "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
        assert r["not_pickles"], "a file was not written by quintet's engine"
        assert r["moved"], "training after the save did not change the state: the test proves nothing"
        assert r["equal"], "the loaded model or optimizer state differs from the state that was saved"


def test_bad_options_are_refused_before_deepspeed_starts():
    from runtime.checkpoint.deepspeed_engine import initialize

    with pytest.raises(ValueError, match=r"unknown quintet_checkpoint options \['pool'\]; valid: \['chunk_mb'"):
        initialize(model=None, config={"quintet_checkpoint": {"pool": 1}})
    with pytest.raises(ValueError, match="quintet_checkpoint.pool_mb must be a positive number, not 0"):
        initialize(model=None, config={"quintet_checkpoint": {"pool_mb": 0}})
