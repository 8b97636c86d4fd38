"""Pipeline schedules as per-rank lists of actions, and a simulator that executes them.

A schedule is, for each pipeline rank, the order in which it runs
    F(chunk, mb)  forward of its model chunk `chunk` on microbatch `mb`,
    B(chunk, mb)  backward (the whole backward, or only the input gradient when W is separate),
    W(chunk, mb)  the weight gradient of an earlier B (zero-bubble schedules only).
Chunk c of rank r is pipeline stage c·p + r (Narayanan et al., SC'21). Communication follows from
the actions: a forward of stage s > 0 receives its input from stage s−1, a backward of a stage
below the last receives its output gradient from stage s+1. Sends never block; receives do.

`simulate` runs every rank's list against that communication model: it checks that each
backward follows its forward, that the messages on each directed link arrive in the order the
receiver expects them (point-to-point matching is FIFO per pair of ranks and communicator;
activations and gradients travel on two communicators, since with interleaving one link
carries both and their orders differ), that nothing deadlocks, and it returns each action's start and end time for given durations — the exact
bubble of a schedule, to compare with theory and with measurement.

    python -m parallel.pipeline.schedules 4 2 8     # print the interleaved schedule, p=4 v=2 m=8
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    kind: str  # "F" | "B" | "W"
    chunk: int
    mb: int

    def __str__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.mb}"


def stage_of(chunk: int, rank: int, p: int) -> int:
    return chunk * p + rank


def one_f_one_b(p: int, m: int, rank: int) -> list[Action]:
    """1F1B (PipeDream-Flush): p−1−rank warm-up forwards, then alternate one forward and one
    backward, then the remaining backwards. At most p−rank microbatches are in flight."""
    warmup = min(p - 1 - rank, m)
    out = [Action("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        out += [Action("F", 0, warmup + i), Action("B", 0, i)]
    out += [Action("B", 0, i) for i in range(m - warmup, m)]
    return out


def interleaved_order(v: int, m: int, group: int, backward: bool) -> list[tuple[int, int]]:
    """Megatron's order of (chunk, mb) on every rank: microbatches in groups of `group`; each
    group runs through chunk 0, 1, …, v−1 (backward: v−1, …, 0) before the next group starts;
    the last group takes the remaining microbatches."""
    order = []
    for first in range(0, m, group):
        last = m if first + group >= m else first + group
        chunks = range(v - 1, -1, -1) if backward else range(v)
        order += [(c, mb) for c in chunks for mb in range(first, last)]
    return order


def interleaved_warmup(p: int, v: int, m: int, rank: int, group: int) -> int:
    """Warm-up forwards of rank `rank`: (p − rank − 1)·2 + (v − 1)·group, capped at m·v."""
    return min((p - rank - 1) * 2 + (v - 1) * group, m * v)


def interleaved_1f1b(p: int, v: int, m: int, rank: int, group: int) -> list[Action]:
    """Interleaved 1F1B with v chunks per rank (Narayanan et al., SC'21; Megatron-LM's order)."""
    fwd = interleaved_order(v, m, group, backward=False)
    bwd = interleaved_order(v, m, group, backward=True)
    warmup = interleaved_warmup(p, v, m, rank, group)
    out = [Action("F", *fwd[k]) for k in range(warmup)]
    for k in range(m * v - warmup):
        out += [Action("F", *fwd[warmup + k]), Action("B", *bwd[k])]
    out += [Action("B", *bwd[k]) for k in range(m * v - warmup, m * v)]
    return out


def zero_bubble_h1(p: int, m: int, rank: int) -> list[Action]:
    """ZB-H1 (Qi et al., 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with each backward split
    into B (input gradient, on the critical path) and W (weight gradient, off it). Rank r lets
    r weight gradients wait during the steady phase and does them where 1F1B would idle — in
    the cool-down, one after each B, then the rest. Peak activation memory stays that of 1F1B:
    a microbatch is released by its W, and at most p−rank forwards are ahead of their W on
    rank r."""
    warmup = min(p - 1 - rank, m)
    out = [Action("F", 0, i) for i in range(warmup)]
    pending: list[int] = []  # microbatches whose B ran and W did not

    def weight():
        out.append(Action("W", 0, pending.pop(0)))

    for i in range(m - warmup):
        out += [Action("F", 0, warmup + i), Action("B", 0, i)]
        pending.append(i)
        if len(pending) > rank:
            weight()
    for i in range(m - warmup, m):
        out.append(Action("B", 0, i))
        pending.append(i)
        weight()
    while pending:
        weight()
    return out


def build(kind: str, p: int, v: int, m: int, rank: int, group: int | None = None) -> list[Action]:
    """Rank `rank`'s actions under schedule `kind` (launch/schema.py's Schedule)."""
    if kind == "interleaved_1f1b":
        return interleaved_1f1b(p, v, m, rank, group or p)
    return {"1f1b": one_f_one_b, "zero_bubble": zero_bubble_h1}[kind](p, m, rank)


class ScheduleError(RuntimeError):
    pass


def simulate(schedules: list[list[Action]], p: int, v: int, durations=None,
             transfer=None) -> list[list[tuple[Action, float, float]]]:
    """Execute every rank's actions in order under the communication model; returns, per rank,
    (action, start, end). `durations(action) -> seconds` (default: F=1, B=2, W=1 when a schedule
    has W actions, else F=1, B=2). `transfer(src, dst) -> seconds` a message takes from rank src
    to rank dst (default: none); sends do not block the sender, and one link carries its
    messages one after another. Raises ScheduleError on a dependency, ordering or deadlock fault.
    """
    n_stages = p * v
    split = any(a.kind == "W" for s in schedules for a in s)
    durations = durations or (lambda a: {"F": 1.0, "B": 1.0 if split else 2.0, "W": 1.0}[a.kind])
    m = 1 + max(a.mb for s in schedules for a in s)
    # Expected per-rank work: every (chunk, mb) forward and backward exactly once, W once if split.
    for r, actions in enumerate(schedules):
        kinds = ("F", "B", "W") if split else ("F", "B")
        want = sorted((k, c, mb) for k in kinds for c in range(v) for mb in range(m))
        got = sorted((a.kind, a.chunk, a.mb) for a in actions)
        if got != want:
            raise ScheduleError(f"rank {r} does not run every F{'/B/W' if split else '/B'} once: {actions}")

    def neighbour(rank: int, chunk: int, step: int) -> tuple[int, int]:
        s = stage_of(chunk, rank, p) + step
        return s % p, s // p

    # Messages in flight per directed link and communicator: (src, dst, "act"|"grad") -> [(tag, arrival)].
    links: dict[tuple[int, int], list[tuple[tuple, float]]] = {}
    link_free: dict[tuple[int, int], float] = {}  # when a directed link has sent what it was given

    def send(src: int, dst: int, kind: str, tag: tuple, at: float) -> None:
        arrival = at
        if transfer is not None:
            arrival = link_free[(src, dst)] = max(at, link_free.get((src, dst), 0.0)) + transfer(src, dst)
        links.setdefault((src, dst, kind), []).append((tag, arrival))

    pos = [0] * p
    clock = [0.0] * p
    done: dict[tuple, float] = {}
    timeline: list[list[tuple[Action, float, float]]] = [[] for _ in range(p)]
    remaining = sum(len(s) for s in schedules)
    while remaining:
        progressed = False
        for r in range(p):
            if pos[r] == len(schedules[r]):
                continue
            a = schedules[r][pos[r]]
            s = stage_of(a.chunk, r, p)
            ready = clock[r]
            if a.kind == "F":
                if s > 0:
                    src, _ = neighbour(r, a.chunk, -1)
                    tag = ("act", s - 1, a.mb)
                    queue = links.get((src, r, "act"), [])
                    if not queue:
                        continue  # blocked on a receive
                    if queue[0][0] != tag:
                        raise ScheduleError(f"rank {r} expects {tag} from rank {src} but the next message is {queue[0][0]}")
                    ready = max(ready, queue.pop(0)[1])
            elif a.kind == "B":
                if ("F", s, a.mb) not in done:
                    raise ScheduleError(f"rank {r} runs {a} before its forward")
                if s < n_stages - 1:
                    src, _ = neighbour(r, a.chunk, +1)
                    tag = ("grad", s + 1, a.mb)
                    queue = links.get((src, r, "grad"), [])
                    if not queue:
                        continue
                    if queue[0][0] != tag:
                        raise ScheduleError(f"rank {r} expects {tag} from rank {src} but the next message is {queue[0][0]}")
                    ready = max(ready, queue.pop(0)[1])
            elif ("B", s, a.mb) not in done:
                raise ScheduleError(f"rank {r} runs {a} before its backward")
            start, end = ready, ready + durations(a)
            clock[r], done[(a.kind, s, a.mb)] = end, end
            timeline[r].append((a, start, end))
            if a.kind == "F" and s < n_stages - 1:
                send(r, neighbour(r, a.chunk, +1)[0], "act", ("act", s, a.mb), end)
            if a.kind == "B" and s > 0:
                send(r, neighbour(r, a.chunk, -1)[0], "grad", ("grad", s, a.mb), end)
            pos[r] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            stuck = {r: str(schedules[r][pos[r]]) for r in range(p) if pos[r] < len(schedules[r])}
            raise ScheduleError(f"deadlock: every rank waits for a message; next actions {stuck}")
    leftover = {k: q for k, q in links.items() if q}
    if leftover:
        raise ScheduleError(f"messages sent but never received: {leftover}")
    return timeline


def bubble(timeline) -> float:
    """Idle time over busy time, the schedule's bubble relative to the ideal (all-busy) time,
    for the whole pipeline: (makespan − busy) / busy on the busiest rank."""
    makespan = max(t[-1][2] for t in timeline)
    busy = max(sum(end - start for _, start, end in t) for t in timeline)
    return (makespan - busy) / busy


def theoretical_bubble(kind: str, p: int, v: int, m: int, tf: float = 1.0, tb: float = 1.0, tw: float = 1.0) -> float:
    """Bubble over ideal time: 1F1B (p−1)/m, interleaved (p−1)/(v·m) (Narayanan et al.),
    ZB-H1 (p−1)·(tf+tb−tw) / (m·(tf+tb+tw)) (Qi et al.)."""
    if kind == "1f1b":
        return (p - 1) / m
    if kind == "interleaved_1f1b":
        return (p - 1) / (v * m)
    if kind == "zero_bubble":
        return (p - 1) * (tf + tb - tw) / (m * (tf + tb + tw))
    raise ValueError(kind)


def main(argv: list[str]) -> None:
    p, v, m = (int(x) for x in argv[:3])
    kind = argv[3] if len(argv) > 3 else ("interleaved_1f1b" if v > 1 else "1f1b")
    for r in range(p):
        print(f"rank {r}: " + " ".join(str(a) for a in build(kind, p, v, m, r)))


if __name__ == "__main__":
    main(sys.argv[1:])
