"""Everything checked on every rank before any process group exists, and how a bad launch stops.

`preflight(cfg, launch)` runs, in order: the config's rules (launch/validate.py); what the run
will do outside its config — the directories it writes (run_dir, checkpoint.dir; committed
checkpoints a fresh start would overwrite), the token file it reads (every id in range, by a
scan unless a sidecar vouches for the file as it is now), the host memory the lazy engine's pool
takes, the credentials it needs (wandb online); and the run directory's lock (one job per
directory, launch/run_lock.py). Each problem names the key, the path or value, and what would
be valid; a run that passes does not fail later on any of these.

`launch.train` calls it from a Hydra callback (`Preflight`, configs/train.yaml), before Hydra
creates the run directory and writes `.hydra/` into it, so a bad launch writes nothing; a bad
launch prints one message and exits with code 2 on every rank (`stop`).
"""
from __future__ import annotations

import json
import logging
import netrc
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from launch import env as launch_env
from launch import run_lock
from launch.validate import ConfigError, validate
from runtime.checkpoint.resume import STEP_DIR
from runtime.data.dataset import dataset_problems
from runtime.hf.checkpoint import HFFolder
from runtime.hf.files import HFFilesError
from runtime.model import ModelArgs
from runtime.data.tokenizer import load_tokenizer

log = logging.getLogger("quintet")
EXIT_BAD_INPUT = 2  # a bad config, file or checkpoint: nothing was trained
EXIT_CHECKPOINT_WRITE = 4  # a checkpoint could not be written (full disk): the run stopped, `latest` intact
PEER_GRACE_S = 1.0


def writable_dir_problem(key: str, path: str) -> str | None:
    """None when `path` is a directory this process can create files in, or can be created as
    one; else what stands in the way. Tried for real (a file created and removed): permission
    bits say nothing about read-only mounts, immutable directories or root."""
    if not str(path).strip():
        return f"{key} is empty; name a directory (an empty path would mean the current directory)"
    target = Path(path)
    if target.exists() and not target.is_dir():
        return f"{key}={path} is a file, not a directory; choose a directory (or a path that does not exist yet)"
    existing = target
    while not existing.exists():  # the deepest part that exists is where creation starts
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={path} cannot be created: {existing} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".quintet-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "" if existing == target else f" (its existing parent {existing})"
        return f"{key}={path} is not writable{where}: {e.strerror}; choose a directory this user can write to"
    return None


def wandb_key_problem(mode: str, env=None) -> str | None:
    """An online wandb run needs an API key: WANDB_API_KEY, or a netrc entry for the W&B host
    (what `wandb login` writes). Checked on every rank, so the key must reach every node."""
    if mode != "online":
        return None
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return None
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return (f"logging.wandb.mode=online needs a W&B API key, and none was found (WANDB_API_KEY is unset and {path} "
            f"has no entry for {host}): export WANDB_API_KEY or run `wandb login` on every node, or use "
            "logging.wandb.mode=offline (and `wandb sync` later)")


def pool_problem(cfg, local_world_size: int, meminfo: str = "/proc/meminfo") -> str | None:
    """The lazy engine's host pool is made resident when the run starts: all of a node's ranks'
    pools must fit in the memory the node has available."""
    c = cfg.checkpoint
    if not (c.enabled and c.engine.value == "lazy"):
        return None
    try:
        available = int(re.search(r"MemAvailable:\s+(\d+) kB", Path(meminfo).read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return None  # not Linux: nothing to compare with
    need = c.pool_mb * 2**20 * local_world_size
    if need > available:
        return (f"checkpoint.pool_mb={c.pool_mb} for each of {local_world_size} rank(s) on this node needs "
                f"{need / 2**30:.1f} GiB of host memory, but {available / 2**30:.1f} GiB is available; use at most "
                f"checkpoint.pool_mb={max(1, available // 2**20 // local_world_size // 2)}")
    return None


def overwrite_problem(cfg) -> str | None:
    """checkpoint.resume=false starts from step 0, and its saves would replace the committed
    checkpoints already in checkpoint.dir: saved work is never overwritten."""
    c = cfg.checkpoint
    directory = Path(c.dir)
    if c.resume or not c.enabled or not directory.is_dir():
        return None
    committed = sorted(p.name for p in directory.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "trainer.json").exists())
    if not committed:
        return None
    return (f"checkpoint.resume=false, but checkpoint.dir={c.dir} holds committed checkpoints ({committed[0]} … "
            f"{committed[-1]}) that this run's saves would overwrite: start over in a new run_dir (or "
            "checkpoint.dir), or resume from them with checkpoint.resume=true")


def io_problems(cfg, local_world_size: int = 1) -> list[str]:
    """Every problem with the run's files, memory and credentials, together."""
    problems = [writable_dir_problem("run_dir", cfg.run_dir), writable_dir_problem("checkpoint.dir", cfg.checkpoint.dir),
                overwrite_problem(cfg), pool_problem(cfg, local_world_size),
                wandb_key_problem(cfg.logging.wandb.mode.value)]
    problems += dataset_problems(cfg.data, load_tokenizer(str(cfg.data.tokenizer)), cfg.model.vocab_size,
                                 cfg.train.seq_len, cfg.seed)
    problems += hf_tensor_problems(cfg.model)
    return [p for p in problems if p]


def hf_tensor_problems(m) -> list[str]:
    """model=hf: every tensor the model needs is in model.hf_path with its shape and a float
    dtype, and nothing else is (read from the safetensors headers, no tensor data)."""
    if not m.get("hf_path"):
        return []
    try:
        return HFFolder(m.hf_path, ModelArgs.from_config(m)).problems()
    except HFFilesError as e:
        return [f"model.hf_path={m.hf_path}: {e}"]


def _locked_dirs(cfg) -> list[tuple[str, str]]:
    """(key, directory) this job must own: run_dir and checkpoint.dir, each with its own lock (so
    that another job pointing its checkpoint.dir into this run's directory is stopped too)."""
    same = Path(cfg.checkpoint.dir).resolve() == Path(cfg.run_dir).resolve()
    return [("run_dir", cfg.run_dir)] + ([] if same else [("checkpoint.dir", cfg.checkpoint.dir)])


_passed: dict[str, object] = {}  # config (as YAML) -> its topology, for a second call in one process


def preflight(cfg, launch: launch_env.LaunchEnv):
    """The run's Topology once every check passed and its directories are this job's; else
    ConfigError naming every problem of the first stage that found any."""
    key = OmegaConf.to_yaml(cfg, resolve=True)
    if key in _passed:
        return _passed[key]
    topo = validate(cfg, launch.world_size)
    problems = io_problems(cfg, launch.local_world_size)
    if problems:
        raise ConfigError(problems)
    job = run_lock.job_id()
    for name, directory in _locked_dirs(cfg):
        try:
            note = run_lock.acquire(directory, job, owner=launch.rank == 0, key=name)
        except run_lock.RunDirBusy as e:
            raise ConfigError([str(e)]) from None
        if note:
            log.warning(note)
    _passed[key] = topo
    return topo


def report(message: str) -> None:
    """One message per node on stderr, and the same text in torchrun's failure summary.

    Every rank exits, so torchrun may SIGTERM a rank before it prints; the error file it reads
    (TORCHELASTIC_ERROR_FILE) puts the message under "Root Cause" whichever rank exits first.
    """
    message = f"quintet: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        payload = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                 "timestamp": str(int(time.time()))}}}
        with open(error_file, "w") as f:
            json.dump(payload, f)
    if launch_env.detect().local_rank == 0:
        print(message, file=sys.stderr, flush=True)


def exit_every_rank(code: int = EXIT_BAD_INPUT) -> None:
    """Exit with `code` on every worker, not only on the first to notice.

    torchrun SIGTERMs the other workers as soon as one exits; one still checking would die by
    that signal instead of reporting. Its peers reach the same verdict within a fraction of a
    second (the same config, or an error every rank agreed on), so each waits a moment before
    exiting and turns a SIGTERM in that moment into `code`. Nothing needs cleaning up: no process
    group exists yet, or every rank leaves it at once.
    """
    if launch_env.detect().world_size > 1:
        def _exit_now(*_):
            sys.stderr.flush()
            os._exit(code)

        signal.signal(signal.SIGTERM, _exit_now)
        time.sleep(PEER_GRACE_S)
        # Not sys.exit: a SIGTERM during the interpreter's slow shutdown would bypass the handler.
        _exit_now()
    sys.exit(code)


def stop(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """The end of a launch that cannot go on: one message, `code` on every rank."""
    report(message)
    exit_every_rank(code)


class Preflight(Callback):
    """Hydra callback: `preflight` on the composed config before Hydra creates the run directory."""

    def on_run_start(self, config, **kwargs) -> None:
        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            preflight(task, launch_env.detect())
        except ConfigError as e:
            stop(str(e))
