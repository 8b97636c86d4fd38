"""Model FLOPs per token against torch's FLOP counter, and the rank-local accounting: the peak
behind MFU, peak memory, the step's efficiency metrics."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from launch.config import compose
from parallel.materialize import initial_values, materialize
from runtime import accounting
from runtime.accounting import MemoryMeter, StepAccounting, datasheet_peak, peak_flops
from runtime.flops import flops_per_token
from runtime.model import ModelArgs, Transformer


@pytest.mark.parametrize("overrides", [["model=tiny"], ["model=tiny_moe"],
                                       ["model=tiny_moe", "model.moe.every=2", "model.moe.shared_experts=1"]],
                         ids=["tiny", "tiny_moe", "tiny_moe-every2-shared"])
def test_flops_per_token_matches_torchs_flop_counter(overrides):
    args = ModelArgs.from_config(compose([*overrides, "run_dir=unused"]).model)
    model = Transformer(args)
    materialize(model, initial_values(model.init_full, 0), torch.device("cpu"))
    batch, seq = 2, 256
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    # The math attention is plain matrix multiplies, which the counter sees (it has no formula
    # for the fused CPU kernel); it computes the whole score matrix, as the formula counts it.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).float().sum().backward()
    counted, ours = counter.get_total_flops(), flops_per_token(args, seq) * batch * seq
    assert abs(ours - counted) <= 0.05 * counted, f"formula {ours:.4g} vs torch's counter {counted:.4g}"
    if args.moe is not None:  # only the activated experts count: all of them would be far more
        every_expert = dataclasses.replace(args, moe=dataclasses.replace(args.moe, top_k=args.moe.num_experts))
        assert counted < 0.7 * flops_per_token(every_expert, seq) * batch * seq


def test_peak_comes_from_the_config_the_datasheet_or_a_cached_probe(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.float32, 1, configured_tflops=2.5) == (2.5e12, "logging.peak_tflops")
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert datasheet_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert datasheet_peak("NVIDIA H200", "bfloat16") == 989.4e12
    assert datasheet_peak("NVIDIA A10G", "bfloat16") is None  # probed instead
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    probes = []
    monkeypatch.setattr(accounting, "measure_peak", lambda *a: probes.append(a) or (1.25e11, True))
    first = peak_flops(cpu, torch.float32, 2)
    assert first[0] == 1.25e11 and "matmul probe" in first[1] and len(probes) == 1
    assert peak_flops(cpu, torch.float32, 2) == first and len(probes) == 1  # measured once, then cached
    peak_flops(cpu, torch.float32, 1)  # another number of processes sharing the node: its own figure
    assert len(probes) == 2
    cache = json.loads((tmp_path / "quintet/peak_flops.json").read_text())
    key = next(iter(cache))
    assert f"torch={torch.__version__}" in key and "|cores=" in key  # keyed by what changes the figure
    # A week later the figure is measured again.
    for entry in cache.values():
        entry["time"] -= accounting.CACHE_TTL_S + 1
    (tmp_path / "quintet/peak_flops.json").write_text(json.dumps(cache))
    peak_flops(cpu, torch.float32, 2)
    assert len(probes) == 3


def test_a_probe_on_a_busy_machine_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(accounting, "measure_peak", lambda *a: (1.2e10, False))
    flops, source = peak_flops(torch.device("cpu"), torch.float32, 4)
    assert flops == 1.2e10 and "the machine was busy, so it was not cached" in source
    assert not (tmp_path / "quintet/peak_flops.json").exists()


@pytest.mark.parametrize("share, trusted", [(0.5, False), (0.95, True)])
def test_the_probe_is_trusted_only_when_it_had_its_cores(monkeypatch, share, trusted):
    clock = {"cpu": 0.0, "wall": 0.0}

    def probe(*a, **k):  # a trial: 1 s of wall time, `share` of it on each of this process's threads
        clock["wall"] += 1.0
        clock["cpu"] += share * torch.get_num_threads()
        return 1e9

    monkeypatch.setattr(accounting, "probe_peak_flops", probe)
    monkeypatch.setattr(accounting.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(accounting.time, "perf_counter", lambda: clock["wall"])
    assert accounting.measure_peak(torch.device("cpu"), torch.float32, trials=2) == (1e9, trusted)


def test_mfu_is_never_above_one_the_peak_is_measured_again(monkeypatch):
    class Memory:
        def reset(self):
            pass

        def peak_bytes(self):
            return 0

    raised, records = [], []
    acc = StepAccounting(flops_per_token=1000, tokens_per_step=1000, world_size=2, peak_flops_total=2e5,
                         memory=Memory(), gather=lambda mine: [mine, mine],
                         raise_peak=lambda achieved: raised.append(achieved) or achieved * 1.5,
                         on_new_peak=records.append)
    m = acc.metrics(step_time_s=1.0)  # 1e6 FLOP/s achieved against a 2e5 peak
    assert raised == [5e5] and m["mfu"] == pytest.approx(1 / 1.5)
    assert records[0]["event"] == "peak" and records[0]["mfu_against_old_peak"] == pytest.approx(5.0)
    assert records[0]["peak_tflops_total"] == pytest.approx(1.5e-6)
    assert acc.metrics(step_time_s=1.0)["mfu"] <= 1 and len(raised) == 1  # the new peak stands


def test_a_configured_peak_below_what_runs_is_raised_to_it():
    flops, source = peak_flops(torch.device("cpu"), torch.float32, 1, configured_tflops=1e-6, at_least=5e9)
    assert flops == 5e9 and source == "logging.peak_tflops"


def test_peaks_print_in_a_unit_that_keeps_their_digits():
    assert accounting.format_flops(12.3e9) == "12.3 GFLOP/s"
    assert accounting.format_flops(989.4e12) == "989 TFLOP/s"
    assert accounting.format_flops(3.2e15) == "3.2 PFLOP/s"


def test_probe_measures_a_plausible_peak():
    measured = accounting.probe_peak_flops(torch.device("cpu"), torch.float32, seconds=0.05)
    assert 1e8 < measured < 1e14


def test_memory_meter_sees_a_steps_peak_and_resets():
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    before = meter.peak_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del block
    assert meter.peak_bytes() >= before + 60 * 2**20
    meter.reset()
    assert meter.peak_bytes() < before + 60 * 2**20 or not meter._resettable


def test_step_accounting_combines_every_ranks_measurements():
    gathered = [[3 * 2**30, 0.02, 0.10, 0.5], [5 * 2**30, 0.01, 0.30, 0.6]]  # (memory, data wait, comm, step time)

    class Memory:
        def reset(self):
            pass

        def peak_bytes(self):
            return gathered[0][0]

    acc = StepAccounting(flops_per_token=1000, tokens_per_step=4096, world_size=2, peak_flops_total=2e7,
                         memory=Memory(), gather=lambda mine: gathered, comm_seconds=lambda: 0.1)
    acc.begin_step()
    with acc.waiting_for_data():
        pass
    m = acc.metrics(step_time_s=0.5)
    assert m["tokens_per_s"] == 8192 and m["tokens_per_s_per_rank"] == 4096
    assert m["tflops_per_device"] == pytest.approx(1000 * 8192 / 2 / 1e12)
    assert m["mfu"] == pytest.approx(1000 * 8192 / 2e7)
    assert m["memory_gib"] == 5 and m["memory_gib_ranks"] == [3, 5]
    assert m["data_wait_s"] == 0.02 and m["comm_s"] == pytest.approx(0.2) and m["comm_s_ranks"] == [0.1, 0.3]
    no_comm = StepAccounting(flops_per_token=1, tokens_per_step=1, world_size=1, peak_flops_total=1, memory=Memory(),
                             gather=lambda mine: [mine]).metrics(1.0)
    assert "comm_s" not in no_comm  # no timing exists: not reported as zero
