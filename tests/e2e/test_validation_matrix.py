"""Every invalid configuration known to the project, checked up front: in one process each exits
2 with its message and no traceback; under torchrun with 2 ranks (slow: QUINTET_SLOW=1) every
worker exits 2 and torchrun fails."""
import json
import subprocess
import sys

import pytest
import torch

from tests.e2e.test_cli import REPO, launch, workers_stopped_with_2
from launch.spawn import scaled

# (overrides, a fragment of the message at world size 2 [, another for world size 1 where it differs])
MATRIX = [
    (["parallel.dp=4"], "tp·cp·dp·pp = 1·1·4·1 = 4 but the world size is"),
    (["parallel.tp=3"], "model.n_heads=8 is not divisible by parallel.tp=3"),
    (["parallel.tp=2", "model.ffn_dim=691"], "model.ffn_dim=691 (the MLP hidden size) is not divisible by parallel.tp=2"),
    (["parallel.sp=true"], "parallel.sp=true needs parallel.tp > 1"),
    (["parallel.tp=2", "parallel.sp=true", "train.seq_len=255"], "train.seq_len=255 is not divisible by parallel.tp=2",
     "world size 1 is not divisible by tp·cp·pp = 2·1·1 = 2"),
    (["parallel.dp_replicate=3"], "parallel.dp_replicate=3 must divide the data-parallel ranks"),
    (["parallel.dp_replicate=2", "parallel.dp_impl=ddp"], "parallel.dp_replicate=2 (HSDP) needs parallel.dp_impl=fsdp",
     "parallel.dp_replicate=2 must divide the data-parallel ranks dp·cp = 1·1 = 1"),
    (["parallel.pp=2", "model.n_layers=5"], "model.n_layers=5 is not divisible by pp·vpp = 2·1 = 2"),
    (["parallel.pp=2", "parallel.pp_layers=[3,2]"], "parallel.pp_layers=[3, 2] must be counts ≥ 0 summing to model.n_layers=4"),
    (["parallel.vpp=2"], "parallel.vpp=2 needs pipeline parallelism"),
    (["parallel.pp=2", "parallel.vpp=2"], "parallel.schedule=1f1b runs one chunk per rank but parallel.vpp=2"),
    (["parallel.pp=2", "parallel.schedule=gpipe"], "Invalid value 'gpipe', expected one of [1f1b, interleaved_1f1b"),
    (["parallel.pp=2", "parallel.pp_layers=7"], "parallel.pp_layers=7 must be a list of 2 layer counts"),
    (["parallel.cp=2", "train.seq_len=250"], "train.seq_len=250 is not divisible by 2·cp = 4"),
    (["parallel.cp=2", "parallel.cp_impl=flash"], "Invalid value 'flash', expected one of [ring, ulysses]"),
    (["parallel.cp=2", "parallel.cp_impl=ulysses", "model.n_heads=3", "model.dim=96", "model.n_kv_heads=3"],
     "model.n_heads / tp = 3 / 1 = 3 is not divisible by parallel.cp=2"),
    (["model=tiny_moe", "model.moe.top_k=9"], "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
    (["model=tiny_moe", "parallel.ep=2", "model.moe.num_experts=7"], "model.moe.num_experts=7 is not divisible by parallel.ep=2"),
    (["model=tiny_moe", "parallel.tp=2", "parallel.ep=2", "parallel.etp=1"], "MoE with parallel.tp=2 needs parallel.sp=true"),
    (["parallel.ep=2"], "parallel.ep=2 needs a model with experts"),
    (["parallel.moe_backend=fssdp"], "parallel.moe_backend=fssdp needs a model with experts"),
    (["model=tiny_moe", "parallel.moe_backend=sharded"], "Invalid value 'sharded', expected one of [ep, fssdp]"),
    (["train.global_batch_size=12", "train.micro_batch_size=8"], "train.global_batch_size=12 is not divisible by train.micro_batch_size"),
    (["train.stop_at_step=500"], "train.stop_at_step=500 must be between 0 (off) and train.steps=200"),
    (["train.lr=0"], "train.lr=0.0 must be > 0"),
    (["train.steps=0"], "train.steps=0 must be ≥ 1"),
    (["train.skip_nonfinite=-1"], "train.skip_nonfinite=-1 must be ≥ 0"),
    (["train.compile_mode=fast"], "Invalid value 'fast', expected one of [default, reduce-overhead"),
    (["parallel.reduce_dtype=float16"], "Invalid value 'float16', expected one of [float32, bfloat16]"),
    (["logging.peak_tflops=0"], "logging.peak_tflops=0.0 must be > 0 (TFLOP/s per device"),
    (["checkpoint.every=-1"], "checkpoint.every=-1 must be ≥ 0"),
    (["checkpoint.keep_last=-2"], "checkpoint.keep_last=-2 must be ≥ 0"),
    (["checkpoint.pool_mb=0"], "checkpoint.pool_mb=0 must be ≥ 1 (MiB)"),
    (["checkpoint.every_s=-5"], "checkpoint.every_s=-5.0 must be ≥ 0"),
    (["parallel.order=tp-cp-xx-dp-pp"], "parallel.order='tp-cp-xx-dp-pp' has unknown dimension(s) ['xx']"),
    (["data=tokens", "data.path=/nonexistent/corpus.npy"], "data.path=/nonexistent/corpus.npy does not exist"),
    (["model.dim=100", "model.n_heads=4"], "head size model.dim/model.n_heads = 100/4 = 25 is odd"),
    (["model=huge"], "Could not find 'model/huge'"),
    (["train.dtype=float16"], "Invalid value 'float16', expected one of [float32, bfloat16, float64]"),
    (["parallel.tp=two"], "Value 'two' of type 'str' could not be converted to Integer"),
    (["train.nonexistent=1"], "Key 'nonexistent' not in 'TrainConfig'"),
    (["+parallel.tpp=2"], "parallel.tpp is not a configuration key (added with +parallel.tpp=...?); did you mean parallel.tp?"),
    (["parallel.tp=0"], "parallel.tp=0 must be ≥ 1"),
    (["parallel.pp=0"], "parallel.pp=0 must be ≥ 1"),
    (["parallel.cp=0"], "parallel.cp=0 must be ≥ 1"),
    (["train.lr=nan"], "train.lr=nan must be > 0"),
    (["optim.beta1=1.5"], "optim.beta1=1.5 must be ≥ 0 and < 1"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps=-5 must be ≥ 0"),
    (["optim.min_lr_ratio=5"], "optim.min_lr_ratio=5.0 must be ≥ 0 and ≤ 1"),
    (["optim.grad_clip=-1"], "optim.grad_clip=-1.0 must be ≥ 0 (0 = no clipping)"),
    (["model.moe.top_k=4"], "model.moe.top_k=4 set on a dense model (model.moe.num_experts=0)"),
    (["parallel.fssdp.hot=3"], "parallel.fssdp.hot=3 only apply with parallel.moe_backend=fssdp"),
    (["data=tokens", "data.path=/"], "data.path=/ is a directory; expected an indexed dataset's PREFIX, a .npy file"),
    (["data=tokens", "data.path=/etc/hostname"], "data.path=/etc/hostname has no .idx beside it and is not a .npy file"),
    (["data=indexed", "data.path=/nonexistent/prefix"], "data.path=/nonexistent/prefix does not exist"),
    (["data.tokenizer=/nonexistent/tokenizer.json"], "data.tokenizer=/nonexistent/tokenizer.json does not exist"),
    (["model.vocab_size=512"], "model.vocab_size=512 is smaller than the vocabulary of data.tokenizer=sample (1024 ids)"),
    (["data=indexed", "data.blend=[[0.5,a],[-1,b]]"], "data.blend: the weight -1 of b must be a finite number ≥ 0"),
    (["data=indexed", "data.blend=[[0,a],[0,b]]"], "data.blend: the weights sum to 0; at least one must be positive"),
    (["eval.every=10"], "eval.every=10 needs validation data"),
    (["run_dir=/proc/quintet-run"], "run_dir=/proc/quintet-run is not writable"),
    (["checkpoint.dir="], "checkpoint.dir is empty; name a directory"),
    (["run_dir="], "run_dir is empty; name a directory"),
    (["checkpoint.pool_mb=100000000"], "checkpoint.pool_mb=100000000 for each of"),
    (["parallel.pp_layers=[a,b]"], "parallel.pp_layers=['a', 'b'] only applies with pipeline parallelism",
     "parallel.pp_layers=['a', 'b'] only applies with pipeline parallelism"),
    (["parallel.pp=2", "parallel.pp_layers=[a,b]"], "parallel.pp_layers=['a', 'b'] must be a list of 2 layer counts",
     "world size 1 is not divisible by tp·cp·pp"),
    (["parallel.timeout_s=1"], "parallel.timeout_s=1.0 must be ≥ 10"),
    (["checkpoint.enabled=false", "checkpoint.every=5"],
     "checkpoint.enabled=false writes no checkpoint, but checkpoint.every=5 asks for one"),
]
if not torch.cuda.is_available():
    MATRIX.append((["train.device=cuda"], "train.device=cuda but no CUDA device is available"))
    MATRIX.append((["train.compile=true", "train.compile_mode=reduce-overhead"],
                   "train.compile_mode=reduce-overhead captures CUDA graphs, which need a CUDA device"))

# Runs each configuration as `python -m launch.train` would, in a child forked from one process
# that imported launch.train once (a fresh interpreter per case would cost ~3 s each); two
# children at a time, one per core.
DRIVER = r"""
import json, os, runpy, sys, warnings
warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package")
import launch.train  # imports torch, Hydra and the rest once, before the forks

def start(overrides):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        os.dup2(w, 2)
        sys.argv = ["launch/train.py", *overrides]
        try:  # as `python -m launch.train` runs it (Hydra finds configs/ from __main__'s file)
            runpy.run_module("launch.train", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
    os.close(w)
    return pid, r

def finish(pid, r):
    with os.fdopen(r) as f:  # a message is far below a pipe's buffer: the other child never blocks
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return [os.waitstatus_to_exitcode(status), out]

cases, results = json.loads(sys.argv[1]), []
for i in range(0, len(cases), 2):
    running = [start(overrides) for overrides in cases[i:i + 2]]
    results += [finish(*child) for child in running]
print(json.dumps(results))
"""


def _run_dir(overrides, path) -> list[str]:
    return [] if any(o.startswith("run_dir=") for o in overrides) else [f"run_dir={path}"]


def test_at_least_thirty_configurations_are_checked():
    assert len(MATRIX) >= 30


def test_every_invalid_configuration_exits_2_in_one_process(tmp_path):
    cases = [[*case[0], *_run_dir(case[0], tmp_path / str(i))] for i, case in enumerate(MATRIX)]
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=REPO, capture_output=True,
                         text=True, timeout=scaled(300))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    wrong = [(case[0], code, text[-600:]) for case, (code, text) in zip(MATRIX, results)
             if code != 2 or case[-1] not in text or "Traceback" in text]
    assert not wrong, "\n\n".join(map(str, wrong))
    assert not any((tmp_path / str(i) / "metrics.jsonl").exists() for i in range(len(MATRIX)))


@pytest.mark.slow
@pytest.mark.parametrize("case", MATRIX, ids=[" ".join(c[0]) for c in MATRIX])
def test_every_invalid_configuration_stops_both_torchrun_ranks_with_exit_code_2(tmp_path, case):
    overrides, fragment = case[0], case[1]
    code, out, _ = launch([*overrides, f"run_dir={tmp_path}"], nproc=2, timeout=scaled(120))
    assert code != 0 and workers_stopped_with_2(out), out
    assert fragment in out, out
