"""Pipeline schedules, checked without processes by executing them in the simulator."""
import pytest

from parallel.pipeline.partition import PartitionError, rank_stages, stage_layers
from parallel.pipeline.schedules import (Action, ScheduleError, build, bubble, interleaved_warmup, simulate,
                                         theoretical_bubble)


def shapes():
    """(kind, p, v, m, group) for many sizes, interleaved only where Megatron's rule allows."""
    out = []
    for p in range(2, 9):
        for m in range(1, 25):
            out += [("1f1b", p, 1, m, p), ("zero_bubble", p, 1, m, p)]
            for v in (2, 3, 4):
                for group in range(p, m + 1):
                    if m % group == 0 or m % group >= p:
                        out.append(("interleaved_1f1b", p, v, m, group))
    return out


SHAPES = shapes()


def run_all(kind, p, v, m, group):
    return simulate([build(kind, p, v, m, r, group) for r in range(p)], p, v)


def test_every_schedule_runs_without_deadlock_in_order_and_matched():
    """simulate raises on a backward before its forward, a W before its B, a receive that does
    not match the next message on its link (FIFO), a message never received, or a deadlock."""
    assert len(SHAPES) > 2500
    failures = []
    for shape in SHAPES:
        try:
            run_all(*shape)
        except ScheduleError as e:
            failures.append((shape, str(e)))
    assert not failures, failures[:5]


def test_interleaved_warmup_counts_follow_megatron():
    for kind, p, v, m, group in SHAPES:
        if kind != "interleaved_1f1b":
            continue
        for r in range(p):
            actions = build(kind, p, v, m, r, group)
            warmup = min((p - r - 1) * 2 + (v - 1) * group, m * v)
            assert interleaved_warmup(p, v, m, r, group) == warmup
            leading_forwards = next((i for i, a in enumerate(actions) if a.kind == "B"), len(actions))
            # Warm-up forwards, then the first forward of the steady phase before the first backward.
            assert leading_forwards == (warmup + 1 if warmup < m * v else m * v), (p, v, m, group, r)


def test_interleaved_runs_every_chunk_over_a_group_before_the_next_group():
    actions = [a for a in build("interleaved_1f1b", 4, 2, 8, 0, 4) if a.kind == "F"]
    assert [(a.chunk, a.mb) for a in actions] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3),
                                                   (0, 4), (0, 5), (0, 6), (0, 7), (1, 4), (1, 5), (1, 6), (1, 7)]
    backward = [(a.chunk, a.mb) for a in build("interleaved_1f1b", 4, 2, 8, 0, 4) if a.kind == "B"]
    assert backward[:5] == [(1, 0), (1, 1), (1, 2), (1, 3), (0, 0)]


def in_flight(actions, release="B"):
    """Most microbatches whose activations are alive at once on a rank (forward done, not
    released by its backward, or by its W in a zero-bubble schedule)."""
    alive = peak = 0
    for a in actions:
        alive += a.kind == "F"
        alive -= a.kind == release
        peak = max(peak, alive)
    return peak


def test_1f1b_and_zero_bubble_keep_1f1b_memory():
    for p in range(2, 9):
        for m in range(p, 3 * p):
            for r in range(p):
                assert in_flight(build("1f1b", p, 1, m, r)) == min(p - r, m)
                # ZB-H1 (Qi et al.): activations live until W, still at most 1F1B's peak of p.
                assert in_flight(build("zero_bubble", p, 1, m, r), release="W") <= p


@pytest.mark.parametrize("m", [4, 8, 16])
def test_simulated_bubbles_equal_theory(m):
    p = 4
    one = bubble(run_all("1f1b", p, 1, m, p))  # F=1, B=2
    half = {"F": 0.5, "B": 1.0}  # v=2 chunks: each chunk does half a stage's work
    inter = bubble(simulate([build("interleaved_1f1b", p, 2, m, r) for r in range(p)], p, 2,
                            durations=lambda a: half[a.kind]))
    zb = bubble(run_all("zero_bubble", p, 1, m, p))  # F=B=W=1
    assert one == pytest.approx(theoretical_bubble("1f1b", p, 1, m))
    assert inter == pytest.approx(theoretical_bubble("interleaved_1f1b", p, 2, m))
    assert zb == pytest.approx(theoretical_bubble("zero_bubble", p, 1, m))
    assert zb < inter < one


def test_the_simulator_catches_broken_schedules():
    p = 2
    good = [build("1f1b", p, 1, 2, r) for r in range(p)]
    backward_first = [good[0], [Action("B", 0, 0), Action("F", 0, 0), Action("F", 0, 1), Action("B", 0, 1)]]
    with pytest.raises(ScheduleError, match="before its forward"):
        simulate(backward_first, p, 1)
    out_of_order = [good[0], [Action("F", 0, 1), Action("B", 0, 1), Action("F", 0, 0), Action("B", 0, 0)]]
    with pytest.raises(ScheduleError, match=r"expects \('act', 0, 1\) from rank 0 but the next message is \('act', 0, 0\)"):
        simulate(out_of_order, p, 1)
    # Rank 0 waits for mb 0's gradient before sending mb 1; rank 1 wants mb 1 before its backward.
    cycle = [[Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
             [Action("F", 0, 0), Action("F", 0, 1), Action("B", 0, 0), Action("B", 0, 1)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(cycle, p, 1)
    with pytest.raises(ScheduleError, match="does not run every"):
        simulate([good[0], good[1][:-1]], p, 1)


def test_partition_even_uneven_and_counting_embedding_and_head():
    assert stage_layers(8, 4, 1) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layers(8, 2, 2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert rank_stages(4, 2, 1) == [1, 5]  # chunk c of rank r is stage c·pp + r
    assert stage_layers(5, 2, 1, [3, 2]) == [range(0, 3), range(3, 5)]
    # 6 layers + embedding + head = 8 units over 4 stages: the ends hold one layer fewer.
    assert stage_layers(6, 4, 1, count_embedding_head=True) == [range(0, 1), range(1, 3), range(3, 5), range(5, 6)]


@pytest.mark.parametrize("args, fragment", [
    ((6, 4, 1), "model.n_layers=6 is not divisible by pp·vpp = 4·1 = 4; set parallel.pp_layers"),
    ((6, 2, 1, [3, 2]), "parallel.pp_layers=[3, 2] must be counts ≥ 0 summing to model.n_layers=6 (they sum to 5)"),
    ((6, 2, 2, [3, 3]), "parallel.pp_layers has 2 entries but there are pp·vpp = 2·2 = 4 stages"),
    ((4, 3, 1, [2, 0, 2]), "pipeline stages [1] would hold no layer"),
])
def test_partition_errors_name_the_values(args, fragment):
    with pytest.raises(PartitionError, match=".*".join(map(__import__("re").escape, fragment.split("…")))):
        stage_layers(*args)


def test_messages_take_their_link_s_time_without_blocking_the_sender():
    """1F1B on two ranks (F=1, B=2) with rank 0 → 1 taking 5: rank 0's forwards run back to back;
    rank 1's first forward waits for the first activation (1 + 5); the link carries one message
    after another, so the second, sent at 2, arrives when the first has gone through and 5 more."""
    schedules = [build("1f1b", 2, 1, 3, r) for r in range(2)]
    slow = simulate(schedules, 2, 1, transfer=lambda src, dst: 5.0 if (src, dst) == (0, 1) else 0.0)
    forwards = {r: [start for a, start, _ in slow[r] if a.kind == "F"] for r in range(2)}
    assert forwards[0][:2] == [0.0, 1.0]
    assert forwards[1][:2] == [6.0, 11.0]
