"""The report's figures, each drawn from a run's records into a matplotlib Figure.

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so drawing keeps no global
state and needs no display. Every function takes plain records (runtime.metrics, runtime.trace)
and returns None when the run has nothing to draw for it.
"""
from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Patch

COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "weight": "#55A868", "comm": "#8C8C8C",
          "idle": "#F2F2F2"}
LABELS = {"forward": "forward", "backward": "backward (input grad, or whole)", "weight": "weight grad",
          "comm": "communication (waiting on a receive)", "idle": "idle"}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def losses(records: list[dict]) -> Figure | None:
    """Language-model loss (and the validation loss where it was evaluated); the MoE balancing
    losses beside it; the learning rate."""
    if not records:
        return None
    aux = [k for k in ("aux_loss", "z_loss") if any(k in r for r in records)]
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3 if aux else 2)
    axes[0].plot(*_series(records, "loss"), color="#4C72B0", label="language model")
    if any("val_loss" in r for r in records):
        axes[0].plot(*_series(records, "val_loss"), color="#937860", marker="o", ms=3, label="validation")
    if aux:
        axes[0].plot(*_series(records, "total_loss"), color="#C44E52", lw=0.8, alpha=0.7, label="total (with balancing)")
        for key, color in zip(aux, ("#DD8452", "#8172B3")):
            axes[1].plot(*_series(records, key), color=color, label=key)
        axes[1].set_title("auxiliary losses (scaled by their coefficients)", fontsize=10)
        axes[1].legend(fontsize=8)
    axes[0].set_title("loss", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[-1].plot(*_series(records, "lr"), color="#55A868")
    axes[-1].set_title("learning rate", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def throughput(records: list[dict]) -> Figure | None:
    """Tokens/s and MFU; peak memory per rank; where the step's time went."""
    if not any("mfu" in r for r in records):
        return None
    fig = Figure(figsize=(13, 3.6))
    ax_tok, ax_mem, ax_time = fig.subplots(1, 3)
    steps, tokens = _series(records, "tokens_per_s")
    ax_tok.plot(steps, tokens, color="#4C72B0")
    ax_tok.set_ylabel("tokens/s (global)")
    ax_tok.set_ylim(bottom=0)
    # MFU is tokens/s times a constant: one curve, read on either axis.
    per_token = [r["mfu"] / r["tokens_per_s"] for r in records if r.get("mfu") and r.get("tokens_per_s")][-1]
    ax_mfu = ax_tok.secondary_yaxis("right", functions=(lambda t: 100 * per_token * t, lambda m: m / (100 * per_token)))
    ax_mfu.set_ylabel("MFU (%)")
    ax_tok.set_title("throughput and model FLOPs utilisation", fontsize=10)
    with_ranks = [r for r in records if "memory_gib_ranks" in r]
    if with_ranks:
        for rank in range(len(with_ranks[-1]["memory_gib_ranks"])):
            ax_mem.plot([r["step"] for r in with_ranks], [r["memory_gib_ranks"][rank] for r in with_ranks],
                        label=f"rank {rank}")
        ax_mem.legend(fontsize=7, ncol=2)
    ax_mem.set_title("peak memory per step (GiB)", fontsize=10)
    steps, total = _series(records, "step_time_s")
    ax_time.plot(steps, total, color="black", lw=0.9, label="step")
    for key, color, label in (("comm_s", "#8C8C8C", "communication (mean over ranks)"),
                              ("data_wait_s", "#DD8452", "waiting for data (max over ranks)")):
        if any(key in r for r in records):
            ax_time.plot(*_series(records, key), color=color, label=label)
    ax_time.set_title("time per step (s)", fontsize=10)
    ax_time.legend(fontsize=7)
    for ax in (ax_tok, ax_mem, ax_time):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def last_common_step(traces: dict[int, list[dict]]) -> int | None:
    """The latest step whose schedule every rank's trace holds complete (its `step` span is
    written after the spans inside it)."""
    done = [{e["args"]["step"] for e in events if e.get("cat") == "step"} for events in traces.values()]
    common = set.intersection(*done) if done else set()
    return max(common) if common else None


def timeline(traces: dict[int, list[dict]]) -> Figure | None:
    """A Gantt chart of one step on every rank: forward, backward, weight gradient,
    communication, and the idle rest of the step."""
    step = last_common_step(traces) if traces else None
    if step is None:
        return None
    spans = {rank: [e for e in events if e.get("ph") == "X" and e["args"].get("step") == step]
             for rank, events in sorted(traces.items())}
    fig = Figure(figsize=(12, 1.4 + 0.5 * len(spans)))
    ax = fig.subplots()
    gantt(ax, spans)
    ax.set_xlabel("time in the step (ms)")
    ax.set_title(f"per-rank timeline of step {step + 1}", fontsize=10, loc="left")
    _legend_below(fig, [Patch(color=COLORS[k], label=LABELS[k]) for k in COLORS], inches=0.35)
    return fig


def gantt(ax, spans: dict[int, list[dict]], label=None) -> None:
    """One lane per rank: its step window (cat "step") as idle background, the spans inside it
    in their category's colour, and the idle share at the end. `label(event)` names a bar."""
    origin = min(e["ts"] for events in spans.values() for e in events if e["cat"] == "step")
    ranks = list(spans)
    for row, rank in enumerate(ranks):
        y = len(ranks) - 1 - row
        window = next(e for e in spans[rank] if e["cat"] == "step")
        ax.barh(y, window["dur"] / 1e3, left=(window["ts"] - origin) / 1e3, height=0.8, color=COLORS["idle"],
                edgecolor="#BBBBBB", linewidth=0.5)
        busy = 0.0
        for e in spans[rank]:
            if e["cat"] not in COLORS:
                continue
            busy += e["dur"]
            left = (e["ts"] - origin) / 1e3
            ax.barh(y, e["dur"] / 1e3, left=left, height=0.8, color=COLORS[e["cat"]], edgecolor="white",
                    linewidth=0.3)
            text = label(e) if label is not None and e["cat"] != "comm" else None
            if text:
                ax.text(left + e["dur"] / 2e3, y, text, ha="center", va="center", fontsize=5, color="white")
        ax.text((window["ts"] + window["dur"] - origin) / 1e3, y, f"  idle {1 - busy / window['dur']:.0%}",
                va="center", fontsize=7)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in reversed(ranks)])
    ax.margins(x=0.08)


def _legend_below(fig: Figure, handles: list, inches: float) -> None:
    """A one-row legend under the axes, in a strip of its own."""
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, inches / fig.get_figheight(), 1, 1))


def expert_load(records: list[dict]) -> Figure | None:
    """Each MoE layer's tokens per expert over steps, relative to the mean (1 = balanced)."""
    with_load = [r for r in records if r.get("expert_load")]
    if not with_load:
        return None
    layers = sorted(with_load[-1]["expert_load"], key=int)
    fig = Figure(figsize=(11, 1.0 + 1.6 * len(layers)))
    axes = fig.subplots(len(layers), 1, sharex=True, squeeze=False)[:, 0]
    steps = [r["step"] for r in with_load]
    image = None
    for ax, layer in zip(axes, layers):
        rows = []
        for r in with_load:
            counts = r["expert_load"].get(layer, [])
            mean = sum(counts) / len(counts) if counts and sum(counts) else 1.0
            rows.append([c / mean for c in counts])
        columns = list(map(list, zip(*rows)))  # [expert][step]
        image = ax.imshow(columns, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, max(map(max, columns))),
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, len(columns) - 0.5, -0.5), interpolation="nearest")
        ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
    axes[-1].set_xlabel("step")
    axes[0].set_title("expert load: tokens routed to each expert / mean over experts", fontsize=10, loc="left")
    fig.colorbar(image, ax=list(axes), fraction=0.03, pad=0.01, label="load / mean")
    return fig


def checkpoints(records: list[dict], events: list[dict]) -> Figure | None:
    """Training steps and checkpoints on one clock: each checkpoint from its request to its
    commit, the part that held the training loop darker."""
    requested = {e["step"]: e for e in events if e["event"] == "checkpoint" and e["phase"] == "requested"}
    committed = {e["step"]: e["time"] for e in events if e["event"] == "checkpoint" and e["phase"] == "committed"}
    timed = [r for r in records if "time" in r]
    if not requested or not timed:
        return None
    origin = min([r["time"] - r["step_time_s"] for r in timed] + [e["time"] for e in requested.values()])
    end = max([r["time"] for r in timed] + list(committed.values()))
    fig = Figure(figsize=(12, 1.9 + 0.3 * len(requested)))
    ax = fig.subplots()
    for i, r in enumerate(timed):
        ax.barh(0, r["step_time_s"], left=r["time"] - r["step_time_s"] - origin, height=0.8,
                color=("#4C72B0", "#8EA9D6")[i % 2])
    labels = ["training steps"]
    for row, (step, e) in enumerate(sorted(requested.items()), start=1):
        done = committed.get(step)
        start = e["time"] - origin
        ax.barh(row, (done or end) - e["time"], left=start, height=0.6, color="#55A868",
                hatch=None if done else "//", alpha=0.6 if done else 0.3)
        ax.barh(row, max(e["blocking_s"], 1e-3), left=start, height=0.6, color="#C44E52")
        flight = f"{done - e['time']:.2f} s to commit" if done else "not committed yet"
        ax.text(max(done or end, e["time"]) - origin, row, f"  {flight}, loop held {e['blocking_s']:.3f} s",
                va="center", fontsize=6)
        labels.append(f"step {step}")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first step")
    ax.set_title("checkpoints: request → commit, against training", fontsize=10, loc="left")
    _legend_below(fig, [Patch(color="#C44E52", label="training loop held by the request"),
                        Patch(color="#55A868", alpha=0.6, label="in flight while training goes on")], inches=0.3)
    return fig
