"""Run a function on N local ranks in fresh processes: forkserver start (torch preloaded),
file-store rendezvous, gloo, a deadline on everything. A failing rank's exception is re-raised
in the caller. Used by the multi-process tests and the benchmarks.

    results = run_ranks(check_something, world_size=4, args=(3,))

`fn(rank, world_size, *args)` must be importable by name (a module-level function). Each rank
sees RANK/WORLD_SIZE/LOCAL_RANK in its environment, as under torchrun, and runs with one
intra-op thread so ranks do not fight over the cores.

Deadlines (the launch's and the process group's) are multiplied by `QUINTET_DEADLINE_FACTOR`
(default 1), so that a busy or slow machine only makes a deadline later, never a test fail.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Imported once by the forkserver, inherited by every rank: megatron-core alone takes seconds
# to import, which 8 ranks on 2 cores would otherwise pay in every launch, and building a model
# on the meta device imports torch._dynamo (0.7 s) through torch's reference ops.
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch._dynamo", "launch.train",
            "megatron.core.parallel_state"]
_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        # The forkserver is exec'd, not forked: give it the repo on its path so that test
        # modules resolve by name, and let it import torch once for every later child.
        path = os.environ.get("PYTHONPATH", "")
        if str(REPO) not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(_PRELOAD)
    return _ctx


def scaled(seconds: float) -> float:
    """`seconds` times QUINTET_DEADLINE_FACTOR (default 1): how long to wait for something that
    should take far less, on a machine that may be busy."""
    raw = os.environ.get("QUINTET_DEADLINE_FACTOR", "1")
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"QUINTET_DEADLINE_FACTOR={raw!r} must be a number ≥ 1") from None
    return seconds * max(factor, 1.0)


class RankFailure(AssertionError):
    pass


def _rank_main(fn, rank, world_size, store_path, pg_timeout_s, args, results, env, run_id):
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), TORCHELASTIC_RUN_ID=run_id)
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, args: tuple = (), timeout_s: float = 120.0,
              pg_timeout_s: float = 60.0, env: dict | None = None) -> list:
    """Run `fn` on `world_size` ranks; returns the per-rank return values (picklable).

    Raises RankFailure with the traceback of the rank that failed first, or TimeoutError naming the
    ranks that did not finish by the deadline; every child is dead when this returns. Both
    timeouts are `scaled`.
    """
    timeout_s, pg_timeout_s = scaled(timeout_s), scaled(pg_timeout_s)
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="quintet-store-") as tmp:
        store_path = os.path.join(tmp, "store")
        run_id = f"spawn-{uuid.uuid4().hex[:12]}"  # the job's identity, as torchrun's run id (launch/run_lock.py)
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(fn, r, world_size, store_path, pg_timeout_s, args, results, env or {}, run_id))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        values, errors = {}, {}
        deadline = time.monotonic() + timeout_s
        first_error_at = deadline  # set when the first failure arrives
        try:
            while len(values) + len(errors) < world_size:
                # After a failure the others are likely stuck in a collective: give them a moment.
                limit = deadline if not errors else min(deadline, first_error_at + 2.0)
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    rank, ok, value = results.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    # A rank that died without reporting (os._exit, a signal) is a failure even
                    # while its peers still run; what it sent before dying is read first.
                    dead = [r for r in range(world_size)
                            if r not in values and r not in errors and not procs[r].is_alive()]
                    if dead and results.empty():
                        time.sleep(0.2)
                        if results.empty():
                            if not errors:
                                first_error_at = time.monotonic()
                            errors.update({r: f"exited with code {procs[r].exitcode} without reporting"
                                           for r in dead})
                    continue
                if ok:
                    values[rank] = value
                else:
                    if not errors:
                        first_error_at = time.monotonic()
                    errors[rank] = value
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)
            results.close()
    if errors:
        # The first failure to arrive is the cause; later ones are usually peers seeing it.
        rank = next(iter(errors))
        others = sorted(set(errors) - {rank})
        also = f" (then ranks {others} too)" if others else ""
        raise RankFailure(f"rank {rank} of {world_size} failed{also}:\n{errors[rank]}")
    missing = [r for r in range(world_size) if r not in values]
    if missing:
        raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f}s")
    return [values[r] for r in range(world_size)]
