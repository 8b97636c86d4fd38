"""What is checked before any process group exists, beyond the config's own rules: every numeric
key's range, keys added with `+`, the directories a run writes, the token file it reads, the wandb
key, and the run directory's lock."""
import dataclasses
import json
import multiprocessing as mp
import os
import typing
from types import SimpleNamespace

import numpy as np
import pytest

from launch import run_lock, schema
from launch.config import compose
from launch.preflight import io_problems, wandb_key_problem, writable_dir_problem
from launch.validate import ConfigError, validate
from runtime.data.dataset import dataset_problems
from runtime.data.sources import write_sidecar
from runtime.data.tokenizer import load_tokenizer


def _numeric(tp) -> bool:
    args = typing.get_args(tp)
    return tp in (int, float) or (args and set(args) - {type(None)} <= {int, float})


def test_every_numeric_key_has_a_range():
    missing = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif typing.get_origin(tp) in (dict, list) and dataclasses.is_dataclass(typing.get_args(tp)[-1]):
                walk(typing.get_args(tp)[-1], f"{prefix}{f.name}.*.")
            elif _numeric(tp) and "range" not in f.metadata:
                missing.append(prefix + f.name)

    walk(schema.QuintetConfig, "")
    assert not missing, f"numeric keys without a range: {missing}"


@pytest.mark.parametrize("override, message", [
    ("+parallel.tpp=2", "parallel.tpp is not a configuration key (added with +parallel.tpp=...?); did you mean parallel.tp?"),
    ("+model.moe.topk=2", "model.moe.topk is not a configuration key"),
    ("+cluster.classes.ib.gbs=5", "cluster.classes.ib.gbs is not a configuration key"),
    ("+surprise=1", "surprise is not a configuration key"),
    ("cluster.classes.ib.gbps=inf", "cluster.classes.ib.gbps=inf must be > 0"),
    ("seed=-1", "seed=-1 must be ≥ 0 and < 9223372036854775808"),
])
def test_added_keys_and_ranges_of_nested_keys(override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose(["run_dir=/x", override]), 1)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_directories_are_tried_for_real(tmp_path):
    assert writable_dir_problem("run_dir", str(tmp_path / "a/b")) is None
    (tmp_path / "file").write_text("x")
    assert "checkpoint.dir=" in writable_dir_problem("checkpoint.dir", str(tmp_path / "file"))
    assert "is a file, not a directory" in writable_dir_problem("checkpoint.dir", str(tmp_path / "file"))
    assert "cannot be created: " in writable_dir_problem("run_dir", str(tmp_path / "file/sub"))
    # Permission bits do not stop root; a file system that refuses does, for anyone.
    assert "is not writable (its existing parent /proc)" in writable_dir_problem("run_dir", "/proc/quintet-x")


def test_every_problem_with_files_is_found_before_the_run(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose([f"run_dir={tmp_path}/run", f"checkpoint.dir={tmp_path}/file", "logging.wandb.mode=online",
                   "data=tokens", f"data.path={tmp_path}"])
    found = io_problems(cfg)
    assert len(found) == 3, found
    assert found[0].startswith(f"checkpoint.dir={tmp_path}/file is a file")
    assert "logging.wandb.mode=online needs a W&B API key" in found[1]
    assert f"data.path={tmp_path} is a directory" in found[2]


def test_an_online_wandb_run_needs_a_key(tmp_path):
    netrc = tmp_path / "netrc"
    env = {"NETRC": str(netrc)}
    assert "WANDB_API_KEY is unset" in wandb_key_problem("online", env)
    assert wandb_key_problem("offline", env) is None
    assert wandb_key_problem("online", {**env, "WANDB_API_KEY": "k"}) is None
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k\n")
    netrc.chmod(0o600)
    assert wandb_key_problem("online", env) is None
    assert "has no entry for wandb.example.com" in wandb_key_problem("online", {**env, "WANDB_BASE_URL": "https://wandb.example.com"})


def test_token_ids_are_checked_by_a_scan_unless_a_sidecar_vouches_for_the_file(tmp_path):
    path = tmp_path / "corpus.npy"
    data = SimpleNamespace(name="tokens", path=str(path), blend=None, dtype=None, valid_fraction=0.0, valid_path=None,
                           valid_blend=None)

    def check():
        return dataset_problems(data, load_tokenizer("bytes"), 256, 4, 0)

    np.save(path, np.frombuffer(b"hello world", dtype=np.uint8))
    write_sidecar(path, 11, 32, 119, "bytes")
    assert check() == []
    # The file changes under its sidecar (a stale .npy.json): the scan finds the id.
    np.save(path, np.array([1, 2, 3, 900, 4, 5], dtype=np.int32))
    (problem,) = check()
    assert "holds token id 900 but ids must be in [0, model.vocab_size=256)" in problem
    np.save(path, np.array([1, 2, -3, 4, 5, 6], dtype=np.int64))
    (problem,) = check()
    assert "holds token id -3" in problem
    os.remove(str(path) + ".json")
    (problem,) = check()
    assert "holds token id -3" in problem
    # A sidecar that matches the file is believed: no scan.
    write_sidecar(path, 6, 0, 9, "bytes")
    assert check() == []


def _hold_lock(directory, job, ready, done):
    run_lock.acquire(directory, job, owner=True)
    ready.set()
    done.wait(60)


def test_one_live_job_per_directory_and_stale_locks_are_taken_over(tmp_path):
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), "job-A", ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        for owner in (True, False):  # rank 0 of another job, and any other rank of it
            with pytest.raises(run_lock.RunDirBusy, match=r"run_dir=.* is in use by another job: job 'job-A' \(pid "
                                                          rf"{holder.pid} on host"):
                run_lock.acquire(tmp_path, "job-B", owner=owner)
        run_lock.acquire(tmp_path, "job-A", owner=False)  # a rank of the holder's own job joins it
    finally:
        done.set()
        holder.join(60)
    # The holder is gone (however it ended): its lock went with it.
    note = run_lock.acquire(tmp_path, "job-B", owner=True)
    assert "took over the lock of job 'job-A'" in note and "no longer running" in note
    assert json.loads((tmp_path / "job.lock").read_text())["job"] == "job-B"
    run_lock.release_all()  # a job that ends normally says so: the next one takes over silently
    assert json.loads((tmp_path / "job.lock").read_text())["released"]
    assert run_lock.acquire(tmp_path, "job-C", owner=True) is None
    run_lock.release_all()


def test_starting_over_never_overwrites_committed_checkpoints(tmp_path):
    step = tmp_path / "run/checkpoints/step_00000004"
    step.mkdir(parents=True)
    cfg = compose([f"run_dir={tmp_path}/run", "checkpoint.resume=false"])
    assert io_problems(cfg) == []  # an uncommitted attempt (no trainer.json) holds nothing
    (step / "trainer.json").write_text('{"step": 4}')
    (problem,) = io_problems(cfg)
    assert problem.startswith(f"checkpoint.resume=false, but checkpoint.dir={tmp_path}/run/checkpoints holds committed "
                              "checkpoints (step_00000004 … step_00000004)")
    assert io_problems(compose([f"run_dir={tmp_path}/run", "checkpoint.resume=false", "checkpoint.enabled=false"])) == []
