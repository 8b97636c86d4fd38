import io
import json

from runtime.metrics import MetricsSink, Progress, read_metrics

RECORD = {"step": 3, "loss": 2.5, "grad_norm": 0.5, "lr": 1e-3, "tokens": 300, "step_time_s": 0.1,
          "tokens_per_s": 1000.0, "mfu": 0.25}


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_updates_one_line_on_a_terminal():
    out = FakeTTY()
    progress = Progress(total=3, every=10, stream=out)
    for step in (1, 2, 3):
        progress.update({**RECORD, "step": step})
    text = out.getvalue()
    assert text.count("\r\033[K") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "step 3/3  loss 2.5000" in text and "mfu 25.0%" in text


def test_progress_logs_plain_lines_elsewhere(caplog):
    caplog.set_level("INFO", logger="quintet")
    progress = Progress(total=30, every=10, stream=io.StringIO())
    for step in range(1, 31):
        progress.update({**RECORD, "step": step})
    assert [r.getMessage().split()[1] for r in caplog.records] == ["1/30", "10/30", "20/30", "30/30"]


def test_only_the_active_sink_writes(tmp_path):
    MetricsSink(str(tmp_path / "a"), active=False, total_steps=3, log_every=1).log(RECORD)
    assert not (tmp_path / "a").exists()
    sink = MetricsSink(str(tmp_path / "b"), active=True, total_steps=3, log_every=1)
    sink.log(RECORD)
    assert read_metrics(tmp_path / "b") == [RECORD]
    assert json.loads((tmp_path / "b/metrics.jsonl").read_text()) == RECORD


def test_wandb_gets_scalars_for_expert_loads():
    from runtime.metrics import wandb_row

    row = wandb_row({**RECORD, "expert_load": {"0": [3.0, 1.0], "2": [2.0, 2.0]}, "note": "x", "time": 1.7e9,
                     "memory_gib_ranks": [1.5, 2.5], "slow_ranks": [1]})
    assert row["moe/layer0/max_over_mean"] == 1.5 and row["moe/layer2/max_over_mean"] == 1.0
    assert row["moe/layer0/expert1"] == 0.25
    assert row["memory_gib/rank1"] == 2.5 and row["monitor/slow_rank1"] == 1 and row["monitor/slow_ranks"] == 1
    assert not {"step", "note", "time"} & row.keys() and row["loss"] == 2.5
