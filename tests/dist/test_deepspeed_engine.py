"""DeepSpeed with quintet's lazy checkpoint engine (chosen by configuration): ZeRO stage 1 and 2
on two CPU ranks save through it while training goes on, and a fresh engine loads exactly the
state of the step it was saved at; the files do not pose as torch files, plain objects in
client_state come back, a save that fails on one rank fails on every rank, and the converters
give DeepSpeed's stock layout (read by its own zero_to_fp32.py) and one fp32 safetensors file."""
import argparse
import os
import subprocess
import sys
import time

import pytest

from launch.spawn import run_ranks, scaled

DS_ENV = {"DS_ACCELERATOR": "cpu"}
# What Megatron-DeepSpeed keeps beside the model: its arguments, and what ds_to_universal needs.
CLIENT_STATE = {"args": argparse.Namespace(lr=0.5), "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def _ds_rank(rank, world, stage, save_dir, client_state=None):
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
    weights = {k: v.detach().numpy().copy() for k, v in eng.module.state_dict().items()}  # by value, not shared memory
    eng.save_checkpoint(save_dir, tag="step3", client_state=client_state or CLIENT_STATE)
    if client_state is not None:  # a state that cannot be stored: every rank raises at the next commit
        try:
            train(eng, 1)
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"
        return "no error"
    train(eng, 3)  # the copy runs behind these; their optimizer steps commit it first
    moved = snapshot(eng)
    eng.destroy()  # DeepSpeed's own teardown drains the engine: `latest` is written by then
    files = sorted(p.name for p in (save_dir / "step3").iterdir())
    not_pickles = all((save_dir / "step3" / f).read_bytes().endswith(MAGIC) for f in files)

    fresh = engine(1)
    path, client = fresh.load_checkpoint(save_dir)
    loaded = snapshot(fresh)
    return {"files": files, "not_pickles": not_pickles, "latest": (save_dir / "latest").read_text(),
            "path": path, "equal": len(loaded) == len(saved) and all(torch.equal(a, b) for a, b in zip(saved, loaded)),
            "moved": any(not torch.equal(a, b) for a, b in zip(saved, moved)), "args": client["args"],
            "weights": weights}


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_saves_and_loads_through_the_lazy_engine(tmp_path, stage):
    results = run_ranks(_ds_rank, 2, args=(stage, tmp_path), timeout_s=180, env=DS_ENV)
    for r in results:
        assert r["latest"] == "step3" and "/step3/" in r["path"]
        # Not torch files, so not torch names.
        assert [f for f in r["files"] if not f.endswith(".py")] == [
            "mp_rank_00_model_states.qtree", "zero_pp_rank_0_mp_rank_00_optim_states.qtree",
            "zero_pp_rank_1_mp_rank_00_optim_states.qtree"]
        assert r["not_pickles"], "a file was not written by quintet's engine"
        assert r["moved"], "training after the save did not change the state: the test proves nothing"
        assert r["equal"], "the loaded model or optimizer state differs from the state that was saved"
        assert r["args"] == argparse.Namespace(lr=0.5)  # plain objects in client_state come back as they were
    if stage == 2:
        _converted_checkpoints_are_deepspeeds_own(tmp_path, results[0]["weights"])


def _converted_checkpoints_are_deepspeeds_own(save_dir, weights):
    """The stock layout is read by DeepSpeed's own zero_to_fp32.py and ds_to_universal; every
    consolidation gives the weights the model had when it was saved."""
    import torch
    from safetensors.torch import load_file

    from launch.deepspeed_convert import main as convert

    convert(["stock", str(save_dir), str(save_dir / "stock")])
    convert(["fp32", str(save_dir), str(save_dir / "fp32.safetensors")])
    stock = save_dir / "stock/step3"
    assert sorted(p.name for p in stock.glob("*.pt")) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # The recovery script DeepSpeed puts in every checkpoint folder, as its own process.
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from zero_to_fp32 import "
              "get_fp32_state_dict_from_zero_checkpoint as fp32; torch.save(fp32(sys.argv[2], 'step3'), sys.argv[3])")
    out = subprocess.run([sys.executable, "-c", script, str(stock), str(save_dir / "stock"), str(save_dir / "ds.pt")],
                         capture_output=True, text=True, timeout=scaled(300), env={**os.environ, **DS_ENV})
    assert out.returncode == 0, out.stderr[-3000:]
    by_deepspeed = torch.load(save_dir / "ds.pt", weights_only=True)  # written just now, by the test
    for consolidated in (load_file(str(save_dir / "fp32.safetensors")), by_deepspeed):
        assert sorted(consolidated) == sorted(weights)
        assert all(torch.equal(consolidated[k], torch.from_numpy(weights[k])) for k in weights)
    # DeepSpeed's universal checkpoint, from the stock layout.
    out = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(stock),
                          "--output_folder", str(save_dir / "universal")], capture_output=True, text=True,
                         timeout=scaled(300), env={**os.environ, **DS_ENV})
    assert out.returncode == 0, out.stderr[-3000:]
    for name, value in weights.items():
        universal = torch.load(save_dir / f"universal/zero/{name}/fp32.pt", weights_only=False)  # the test's own file
        universal = universal["param"] if isinstance(universal, dict) else universal
        assert torch.equal(universal.reshape(value.shape), torch.from_numpy(value)), name


def test_a_save_that_fails_on_one_rank_raises_on_every_rank(tmp_path):
    # Only rank 0 writes the model states file, where client_state goes.
    errors = run_ranks(_ds_rank, 2, args=(2, tmp_path, {"unstorable": object()}), timeout_s=180, env=DS_ENV)
    for error in errors:
        assert error.startswith("CheckpointWriteError: could not write the checkpoint of tag step3"), errors
        assert "rank 0: " in error and "mp_rank_00_model_states.qtree: cannot checkpoint" in error, errors
    assert not (tmp_path / "step3").exists() and not (tmp_path / "latest").exists()


def test_bad_options_are_refused_before_deepspeed_starts():
    from runtime.checkpoint.deepspeed_engine import initialize

    with pytest.raises(ValueError, match=r"unknown quintet_checkpoint options \['pool'\]; valid: \['chunk_mb'"):
        initialize(model=None, config={"quintet_checkpoint": {"pool": 1}})
    with pytest.raises(ValueError, match="quintet_checkpoint.pool_mb must be a positive number, not 0"):
        initialize(model=None, config={"quintet_checkpoint": {"pool_mb": 0}})
