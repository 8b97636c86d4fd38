"""Observability end to end: a traced pp=2 vpp=2 run and a tiny_moe ep=2 run with checkpoints,
their per-step accounting and trace, and `python -m launch.report` on them — also while a run
is still writing."""
import shutil

import numpy as np
import pytest
from matplotlib.image import imread

from launch.report import main as report_main
from runtime.metrics import read_events
from runtime.trace import read_trace
from tests.training import train

L4, MB2 = ["model.n_layers=4"], ["train.micro_batch_size=2"]  # 4 microbatches per rank
PIPELINE = L4 + MB2 + ["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b", "trace=true"]
MOE = ["model=tiny_moe", "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
       "model.moe.expert_ffn_dim=64", "parallel.ep=2", "checkpoint.every=2", "logging.peak_tflops=0.5"]
ACCOUNTING = ("tokens_per_s", "tokens_per_s_per_rank", "flops_per_token", "tflops_per_device", "mfu", "memory_gib",
              "memory_gib_ranks", "data_wait_s", "comm_s", "comm_s_ranks", "time")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"pipeline": (root / "pipeline", train(root / "pipeline", PIPELINE + ["train.steps=3"], world_size=2)),
            "moe": (root / "moe", train(root / "moe", MOE + ["train.steps=6", f"checkpoint.dir={root}/moe/ckpt"],
                                        world_size=2))}


def assert_picture(path):
    """The PNG exists, decodes, and is not blank."""
    assert path.exists(), f"{path.name} was not drawn"
    pixels = imread(path)[..., :3]
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
    assert np.var(pixels) > 1e-3, f"{path.name} is blank (pixel variance {np.var(pixels):.2e})"


def test_every_step_reports_throughput_mfu_memory_and_waits(runs):
    for run_dir, records in runs.values():
        start = read_events(run_dir, "start")[-1]
        for r in records:
            assert set(ACCOUNTING) <= r.keys(), set(ACCOUNTING) - r.keys()
            assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / (start["peak_tflops_total"] * 1e12))
            assert r["tflops_per_device"] == pytest.approx(r["mfu"] * start["peak_tflops_total"] / 2)
            assert 0.05 < r["memory_gib"] == max(r["memory_gib_ranks"]) and len(r["comm_s_ranks"]) == 2
            assert 0 <= r["data_wait_s"] < r["step_time_s"] and 0 < r["comm_s"] < r["step_time_s"]
    moe_run, _ = runs["moe"]
    start = read_events(moe_run, "start")[-1]
    assert start["peak_source"] == "logging.peak_tflops" and start["peak_tflops_total"] == 1.0


def test_trace_records_the_timeline_and_the_bubble(runs):
    run_dir, records = runs["pipeline"]
    # Reported every step (its size on a model this small is mostly communication overhead;
    # benchmarks/pipeline_bubble.py measures it against theory).
    assert all(0 < r["pp_bubble"] < float("inf") for r in records)
    for rank in range(2):
        assert (run_dir / f"trace/rank{rank}.json").read_text().rstrip().endswith("]")  # closed: plain JSON
        events = read_trace(run_dir / f"trace/rank{rank}.json")
        compute = [e for e in events if e.get("cat") in ("forward", "backward")]
        # 3 steps × 4 microbatches × 2 chunks, forward and backward.
        assert len(compute) == 3 * 4 * 2 * 2
        assert {(e["args"]["chunk"], e["args"]["mb"]) for e in compute} == {(c, m) for c in range(2) for m in range(4)}
        assert any(e.get("cat") == "comm" for e in events)
        assert all(e["dur"] >= 0 for e in events if e.get("ph") == "X")


def test_report_draws_every_figure_the_runs_have(runs, capsys):
    expected = {"pipeline": ["loss", "throughput", "timeline"],
                "moe": ["loss", "throughput", "expert_load", "checkpoints"]}
    for name, (run_dir, _) in runs.items():
        assert report_main([str(run_dir)]) == 0
        for figure in expected[name]:
            assert_picture(run_dir / "report" / f"{figure}.png")
        page = (run_dir / "report/index.html").read_text()
        assert all(f'src="{figure}.png' in page for figure in expected[name]) and "MFU (median)" in page
    assert "no data for: expert_load, checkpoints" in capsys.readouterr().out
    checkpoints = read_events(runs["moe"][0], "checkpoint")
    assert [(e["step"], e["phase"]) for e in checkpoints] == [(s, p) for s in (2, 4, 6) for p in ("requested", "committed")]


def test_report_reads_a_run_that_is_still_writing(runs, tmp_path):
    """Cut metrics.jsonl and the traces mid-line and drop the traces' closing bracket, as a
    reader sees them while the ranks append."""
    live = tmp_path / "live"
    shutil.copytree(runs["pipeline"][0], live, ignore=shutil.ignore_patterns("report"))
    metrics = live / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-40])
    for trace in (live / "trace").glob("rank*.json"):
        text = trace.read_text().rstrip().removesuffix("]")
        trace.write_text(text[:-30])
    assert report_main([str(live)]) == 0
    for figure in ("loss", "throughput", "timeline"):
        assert_picture(live / "report" / f"{figure}.png")
    assert report_main([str(tmp_path / "nothing")]) == 2
