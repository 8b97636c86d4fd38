"""The real command line: `python -m launch.train` and `torchrun -m launch.train` in subprocesses."""
import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from launch.spawn import scaled
from runtime.metrics import read_metrics
from tests.training import SMALL, assert_same_losses
from tests.wandb_offline import offline_configs, offline_history

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def run_command(cmd, timeout, env=None, cwd=REPO):
    """Run `cmd` in its own process group; at the deadline (`scaled`) the whole group is killed
    (torchrun's workers too, not only torchrun) and TimeoutExpired is raised. Returns (code, output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=scaled(timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a finished launch
        except ProcessLookupError:
            pass
    return proc.returncode, out


def launch(args, nproc=1, timeout=600, env=None):
    """Run launch.train; returns (exit code, combined output, seconds)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "launch.train", *args]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "launch.train", *args]
    start = time.monotonic()
    code, out = run_command(cmd, timeout, env)
    return code, out, time.monotonic() - start


def workers_stopped_with_2(out: str) -> bool:
    """Whether torchrun's summary lists a worker that exited with code 2 and none that failed
    otherwise. Every worker stops with 2 when it reaches the check, but one still starting when
    another has stopped is ended by torchrun (SIGTERM), which lists only the workers that
    stopped on their own: how many reach the check first depends on the machine's load."""
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", out)
    return "2" in codes and set(codes) <= {"2", "-15"}


def test_one_process_and_two_torchrun_ranks_write_the_same_losses(tmp_path):
    """The default data (the sample corpus in the shipped BPE), seed 1, 8 steps of a 2-layer
    model, 1 process vs torchrun with dp=2: the same losses (every layout's 20 steps are in
    tests/dist/test_parity.py, the default model's training in test_the_main_job_learns)."""
    model = ["model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96"]
    code_a, out_a, _ = launch([*model, "train.steps=8", "seed=1", f"run_dir={tmp_path}/A"])
    assert code_a == 0, out_a
    code_b, out_b, _ = launch([*model, "parallel.dp=2", "train.steps=8", "seed=1", f"run_dir={tmp_path}/B"], nproc=2)
    assert code_b == 0, out_b
    a, b = read_metrics(tmp_path / "A"), read_metrics(tmp_path / "B")
    assert len(a) == 8
    assert_same_losses(a, b, rtol=1e-5)
    for record in b:
        assert {"step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s"} <= set(record)
    # Only rank 0 writes the run's files, into the one shared directory.
    assert (tmp_path / "B/config.yaml").is_file() and (tmp_path / "B/.hydra/config.yaml").is_file()
    assert "dp_impl: fsdp" in (tmp_path / "B/config.yaml").read_text()


def test_the_main_job_learns(tmp_path):
    """The README's main job (default config: the sample corpus in the shipped BPE, 2 ranks): its
    first 10 of 200 steps, still in the learning-rate warm-up, already lower the loss (on this
    machine step 10 is at 0.88 of step 1)."""
    code, out, _ = launch([f"run_dir={tmp_path}", "train.stop_at_step=10"], nproc=2)
    assert code == 0, out
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert records[-1]["loss"] <= 0.93 * records[0]["loss"], [r["loss"] for r in records]


BAD = {
    # name: (nproc, overrides, text the message must contain)
    "world size mismatch under torchrun": (2, ["parallel.dp=4"], "tp·cp·dp·pp = 1·1·4·1 = 4 but the world size is 2"),
    "non-integer size under torchrun": (2, ["parallel.tp=two"], "Value 'two' of type 'str' could not be converted to Integer"),
    "heads not divisible by tp under torchrun": (2, ["parallel.tp=2", "model.n_heads=3", "model.dim=192", "model.n_kv_heads=3"],
                                                 "model.n_heads=3 is not divisible by parallel.tp=2"),
    "sp without tp under torchrun": (2, ["parallel.sp=true"], "parallel.sp=true needs parallel.tp > 1"),
    "sequence not divisible by 2·cp under torchrun": (2, ["parallel.cp=2", "train.seq_len=250"],
                                                     "train.seq_len=250 is not divisible by 2·cp = 4"),
    "batch not divisible": (1, ["train.global_batch_size=12", "train.micro_batch_size=8"],
                            "train.global_batch_size=12 is not divisible by train.micro_batch_size × data-parallel size = 8 × 1 = 8"),
    "unknown model": (1, ["model=huge"], "Could not find 'model/huge'"),
    "missing data file": (1, ["data=tokens", "data.path=/nonexistent/corpus.npy"], "data.path=/nonexistent/corpus.npy does not exist"),
    "unknown dtype": (1, ["train.dtype=float16"], "Invalid value 'float16', expected one of [float32, bfloat16, float64]"),
    "unknown dimension in the order": (1, ["parallel.order=tp-cp-xx-dp-pp"], "parallel.order='tp-cp-xx-dp-pp' has unknown dimension(s) ['xx']"),
    "experts not fitting the stage under torchrun": (2, ["parallel.ep=3"],
                                                     "etp·ep = 1·3 = 3 does not divide the ranks of a pipeline stage, tp·cp·dp = 1·1·2 = 2"),
}


# One case per path (validation and Hydra's composition, one process and torchrun) in the default
# suite; the rest are in tests/e2e/test_validation_matrix.py too and run here with QUINTET_SLOW=1.
DEFAULT = ("world size mismatch under torchrun", "non-integer size under torchrun", "unknown model",
           "batch not divisible")


@pytest.mark.parametrize("case", [c if c in DEFAULT else pytest.param(c, marks=pytest.mark.slow) for c in BAD])
def test_bad_input_stops_every_rank_with_one_message_and_exit_code_2(tmp_path, case):
    nproc, overrides, expected = BAD[case]
    code, out, _ = launch([*overrides, f"run_dir={tmp_path}"], nproc=nproc, timeout=120)
    assert expected in out, out
    if nproc == 1:
        assert code == 2, out
        assert "Traceback" not in out, out
    else:
        # The workers exit 2 (`workers_stopped_with_2`); torchrun itself exits 1 and prints its
        # own ChildFailedError, but no worker prints a traceback.
        assert code != 0
        assert workers_stopped_with_2(out), out
        assert out.count("Traceback") == 1 and "ChildFailedError" in out, out
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_truncated_dataset_stops_both_torchrun_ranks_before_training(tmp_path):
    """A file problem (found by reading the data, not the config) stops every rank with exit 2."""
    from launch.tokenize import tokenize

    (tmp_path / "a.txt").write_text("some text " * 500)
    tokenize([str(tmp_path / "a.txt")], "sample", str(tmp_path / "data"), progress=False)
    data = (tmp_path / "data.bin").read_bytes()
    (tmp_path / "data.bin").write_bytes(data[:-100])
    run_dir = tmp_path / "run"
    code, out, _ = launch(["data=indexed", f"data.path={tmp_path / 'data'}", f"run_dir={run_dir}"], nproc=2, timeout=120)
    assert code != 0 and workers_stopped_with_2(out), out
    assert "data.path=" in out and "data.bin is" in out and "truncated, or the two files do not belong together" in out
    assert not (run_dir / "metrics.jsonl").exists()


def test_wandb_offline_records_losses_figures_config_and_no_secret(tmp_path):
    secret = "0123456789abcdef-not-a-real-key-5f3a"
    code, out, _ = launch([*SMALL, "train.steps=5", "logging.wandb.mode=offline", f"run_dir={tmp_path}"],
                          env={"WANDB_API_KEY": secret})
    assert code == 0, out
    history = offline_history(tmp_path)
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert [row["loss"] for row in history if "loss" in row] == losses
    assert [row["_step"] for row in history if "loss" in row] == [1, 2, 3, 4, 5]
    # The report's figures, the same files as <run_dir>/report/, at the last step; the resolved
    # config once.
    (last,) = [row for row in history if "report/loss._type" in row]
    assert last["_step"] == 5
    for figure in ("loss", "throughput"):
        assert last[f"report/{figure}._type"] == "image-file"
        assert last[f"report/{figure}.sha256"] == hashlib.sha256((tmp_path / f"report/{figure}.png").read_bytes()).hexdigest()
    (config,) = [c for c in offline_configs(tmp_path) if "model" in c]
    assert config["train"]["steps"] == 5 and config["model"] == yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    assert secret not in out
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the API key leaked into {path}"
