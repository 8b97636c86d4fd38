"""benchmarks/gpu_mfu.py without a GPU: it refuses with a clear message, and its measuring path
(launch.train's code path, FSDP2 over a group of one, the accounting it reads) runs on a small
model on CPU, so the benchmark is ready for the day a GPU is there."""
import pytest
import torch

from benchmarks import gpu_mfu
from launch.spawn import run_ranks
from tests.training import SMALL


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_refuses_without_cuda(capsys):
    assert gpu_mfu.main(["--quick"]) == 2
    assert "measures MFU on a CUDA GPU, and this machine has none" in capsys.readouterr().err


def _measure(rank, world, fsdp):
    from torch.distributed.fsdp import FSDPModule

    import launch.train

    wrapped = []
    real = launch.train.parallelize

    def spy(*args, **kwargs):
        par = real(*args, **kwargs)
        wrapped.append(isinstance(par.chunks[0], FSDPModule))
        return par

    launch.train.parallelize = spy
    small = [o for o in SMALL if not o.startswith("train.steps")]
    result = gpu_mfu.measure([*small, "train.dtype=bfloat16", "train.device=cpu"], steps=gpu_mfu.WARMUP + 3, fsdp=fsdp)
    return result, wrapped


def test_measure_reports_mfu_under_fsdp_over_one_rank():
    """The contender that differs from launch.train's own path: FSDP2 over a group of one."""
    ((result, wrapped),) = run_ranks(_measure, 1, args=(True,))
    assert wrapped == [True]
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] and result["flops_per_token"] > 0
