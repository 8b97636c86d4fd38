"""A run's report: PNG figures and an HTML page beside them in `<run_dir>/report/`.

It reads only what the run writes as it goes — metrics.jsonl (steps and events), config.yaml,
trace/rank<k>.json — so it works on a run that is still going, and on a copy of a finished
run's directory anywhere.

    python -m launch.report <run_dir>
"""
from __future__ import annotations

import html
import os
import statistics
import time
from pathlib import Path

from runtime.metrics import read_events, read_metrics
from runtime.trace import read_trace

# file stem → (title, what the figure shows)
FIGURES = {
    "loss": ("Loss and learning rate", "language-model and validation loss, the MoE balancing losses, the schedule"),
    "throughput": ("Throughput, MFU, memory, step time", "tokens/s and MFU against the devices' peak; "
                   "peak memory per rank; communication and data-loading time per step"),
    "timeline": ("Pipeline timeline", "one step on every rank, from the trace (trace=true)"),
    "expert_load": ("Expert load", "tokens per expert relative to the mean, per MoE layer and step"),
    "checkpoints": ("Checkpoints", "each checkpoint from request to commit, against the training steps"),
}


def load_traces(run_dir: Path) -> dict[int, list[dict]]:
    traces = {}
    for path in sorted((run_dir / "trace").glob("rank*.json")):
        try:
            traces[int(path.stem.removeprefix("rank"))] = read_trace(path)
        except (ValueError, OSError):
            continue  # a file another rank is creating this instant
    return traces


def figures(run_dir: str | os.PathLike) -> dict:
    """The run's figures by name (only those it has data for)."""
    from runtime import plots  # matplotlib is imported only to draw

    run_dir = Path(run_dir)
    records, events = read_metrics(run_dir), read_events(run_dir)
    made = {
        "loss": plots.losses(records),
        "throughput": plots.throughput(records),
        "timeline": plots.timeline(load_traces(run_dir)),
        "expert_load": plots.expert_load(records),
        "checkpoints": plots.checkpoints(records, events),
    }
    return {name: fig for name, fig in made.items() if fig is not None}


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Draw the figures into `out_dir` (default `<run_dir>/report`) and write index.html there;
    returns the PNG paths by figure name."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures(run_dir).items():
        paths[name] = out / f"{name}.png"
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, paths[name])  # a browser reloading the page never sees half a picture
    (out / "index.html").write_text(page(run_dir, paths))
    return paths


def summary(records: list[dict], events: list[dict]) -> list[tuple[str, str]]:
    """The figures that say whether a run is efficient, as (label, value) rows."""
    if not records:
        return [("steps", "none yet")]
    last = records[-1]
    steady = records[len(records) // 5:] or records  # without the first steps' warm-up
    rows = [("steps done", str(last["step"])), ("last loss", f"{last['loss']:.4f}")]
    evaluated = [r for r in records if "val_loss" in r]
    if evaluated:
        rows.append(("last validation loss", f"{evaluated[-1]['val_loss']:.4f} (perplexity "
                                             f"{evaluated[-1]['val_ppl']:,.2f}, step {evaluated[-1]['step']})"))
    rows += [("tokens/s (median)", f"{statistics.median(r['tokens_per_s'] for r in steady):,.0f}")]
    accounted = [r for r in steady if "mfu" in r]  # steps of a launch before issue 14's metrics have none
    if accounted:
        rows += [("MFU (median)", f"{statistics.median(r['mfu'] for r in accounted):.1%}"),
                 ("TFLOP/s per device (median)", f"{statistics.median(r['tflops_per_device'] for r in accounted):.3g}"),
                 ("model FLOPs per token", f"{accounted[-1]['flops_per_token']:.4g}"),
                 ("peak memory (max over ranks)", f"{max(r['memory_gib'] for r in accounted):.2f} GiB")]
    start = [e for e in events if e["event"] == "start"]
    if start:
        rows.append(("peak TFLOP/s per device", f"{start[-1]['peak_tflops_per_device']:.4g} "
                                                f"({start[-1]['peak_source']})"))
    hangs = [e for e in events if e["event"] == "hang"]
    if hangs:
        rows.append(("hangs", "; ".join(f"rank {h['rank']}: {h['op']} missing {h['missing']}" for h in hangs)))
    return rows


def page(run_dir: Path, paths: dict[str, Path]) -> str:
    records, events = read_metrics(run_dir), read_events(run_dir)
    config = run_dir / "config.yaml"
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary(records, events))
    sections = "".join(
        f"<h2>{html.escape(FIGURES[name][0])}</h2><p>{html.escape(FIGURES[name][1])}</p>"
        f'<img src="{path.name}?v={int(path.stat().st_mtime)}" alt="{name}">'
        for name, path in paths.items())
    missing = [FIGURES[n][0] for n in FIGURES if n not in paths]
    note = f"<p class=note>Not drawn (no data in this run): {html.escape(', '.join(missing))}.</p>" if missing else ""
    config_text = html.escape(config.read_text()) if config.exists() else "(no config.yaml)"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>quintet report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222}}
img{{max-width:100%;border:1px solid #ddd}} th{{text-align:left;padding-right:2em}} .note{{color:#777}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;max-height:30em}}</style></head><body>
<h1>quintet run {html.escape(str(run_dir))}</h1>
<p>Report written {time.strftime("%Y-%m-%d %H:%M:%S")}; run it again to refresh:
<code>python -m launch.report {html.escape(str(run_dir))}</code></p>
<table>{rows}</table>{sections}{note}
<h2>Configuration</h2><pre>{config_text}</pre>
<p class=note>Raw records: metrics.jsonl, {len(records)} steps and {len(events)} events.</p>
</body></html>
"""
