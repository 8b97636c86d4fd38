"""DeepSpeed's checkpoints through quintet's lazy engine.

`QuintetCheckpointEngine` implements DeepSpeed's `CheckpointEngine` interface as a *decoupled*
engine (the protocol DeepSpeed 0.16+ defines for DataStates-LLM):

    save_checkpoint(dir, tag)   create(info), then save(state_dict, path) per file: each file's
                                tensors join the lazy pipeline (runtime/checkpoint/lazy_writer.py)
                                and the call returns before they are copied; the rest of the
                                state dict is encoded at once (runtime/checkpoint/tree.py), since
                                plain values may change before the copy runs. A state that cannot
                                be encoded fails the checkpoint (on every rank, below), not the
                                one rank that saves it
    engine.step()               DeepSpeed calls commit(get_commit_info()) right before the
                                optimizer step (every rank): the checkpoint is sealed, commit
                                waits for its copy only, and the ranks agree whether any of them
                                knows of a failed checkpoint; if so every rank raises it there.
                                Writing goes on behind training
    durable everywhere          rank 0 writes `latest` (atomically) once every rank's files are
                                fsynced. DeepSpeed would write it right after commit returns,
                                before the files are durable, so get_commit_info hands DeepSpeed a
                                copy with save_latest=False and the engine writes it itself
    engine.destroy()            calls cleanup(), which waits for every checkpoint to commit

The directory layout is DeepSpeed's, but a file DeepSpeed names `X.pt` is written as `X.qtree`:
its content is tree.py's format, not a torch pickle, and does not pretend to be one (`load`
never unpickles; DeepSpeed's own tools would fail on it). DeepSpeed's `load_checkpoint` finds
the files through `_get_all_ckpt_names`, which `use_quintet_checkpoints` points at `.qtree`
files. `python -m launch.deepspeed_convert` turns such a checkpoint into DeepSpeed's stock layout
(for zero_to_fp32.py and ds_to_universal) or one consolidated fp32 safetensors file. Use it by
configuration: replace `deepspeed.initialize` with
`runtime.checkpoint.deepspeed_engine.initialize` and add to the DeepSpeed config

    "quintet_checkpoint": {"enabled": true, "pool_mb": 256, "chunk_mb": 64}

or attach it to an existing engine with `use_quintet_checkpoints(engine, ...)`.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import shutil
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from runtime.checkpoint.format import CheckpointError, CheckpointWriteError
from runtime.checkpoint.lazy_writer import MB, LazyWriter
from runtime.checkpoint.sync import atomic_write
from runtime.checkpoint.tree import flatten, read_tree, write_index

CONFIG_KEY = "quintet_checkpoint"
TREE_SUFFIX = ".qtree"
OPTIONS = {"enabled": True, "pool_mb": 256, "chunk_mb": 64, "timeout_s": 600.0}


class QuintetCheckpointEngine(CheckpointEngine):
    def __init__(self, config_params=None, *, pool_mb: int = 256, chunk_mb: int = 64, timeout_s: float = 600.0):
        super().__init__(config_params)
        self.name = "QuintetLazyCheckpointEngine"
        self.writer = LazyWriter(dist.get_rank(), pool_bytes=int(pool_mb * MB), chunk_bytes=int(chunk_mb * MB),
                                 timeout_s=timeout_s, pin=get_accelerator().device_name() == "cuda")
        self._info: CheckpointCommitInfo | None = None  # of the checkpoint being saved (not sealed)
        self._ckpt = None

    def create(self, info: CheckpointCommitInfo):
        if self._ckpt is not None:  # saved twice without an optimizer step between
            self._seal()
        self._info = info
        where = Path(info.save_dir) / str(info.tag)
        self._ckpt = self.writer.begin(f"tag {info.tag}", partial(_name_latest, info),
                                       on_abort=partial(shutil.rmtree, where, ignore_errors=True), where=str(where))

    def save(self, state_dict, path: str):
        if self._ckpt is None:
            raise RuntimeError(f"save({path!r}) before create(): DeepSpeed's save_checkpoint calls create first")
        try:
            tree, tensors = flatten(state_dict)
        except TypeError as e:
            # Often only one rank saves a given file: failing here would leave the others
            # waiting in their next collective. The checkpoint fails instead, on every rank.
            self._ckpt.error = self._ckpt.error or CheckpointError(f"{tree_path(path)}: {e}")
            return
        entries = [{"shape": list(t.shape)} for t in tensors]
        self.writer.add_file(self._ckpt, tree_path(path), tensors, entries, partial(write_index, tree))

    def load(self, path: str, map_location=None):
        return load_tree_file(path, map_location)

    def commit(self, info: CheckpointCommitInfo):
        """Seal the checkpoint and wait until it is copied (not written): the optimizer step may
        run. Every rank calls it at the same step, so here the ranks agree (one small all-gather
        on the default group) whether any knows of a failed checkpoint, and then all raise it."""
        failed_here = self._ckpt is not None and self._ckpt.error is not None
        if self._ckpt is not None:
            self._seal()
        self.writer.wait()
        flags = [False] * dist.get_world_size()
        dist.all_gather_object(flags, failed_here or self.writer.failed)
        if any(flags):
            self.writer.drain()  # every vote in flight settles: each rank then holds the error and raises it
            raise CheckpointWriteError(f"another rank could not commit checkpoint {info.tag} in {info.save_dir}")
        return True

    def get_commit_info(self):
        if self._info is None:
            return None
        return dataclasses.replace(self._info, save_latest=False)  # `latest` moves when durable

    def is_decoupled(self):
        return True

    def preserves_storage_sharing(self):
        # Only a view's own bytes are copied, so DeepSpeed need not clone views before save().
        return False

    def cleanup(self):
        """Every checkpoint saved so far is committed on return (DeepSpeed's destroy() calls it)."""
        if self._ckpt is not None:
            self._seal()
        self.writer.drain()

    def _seal(self):
        self.writer.seal(self._ckpt)
        self._ckpt, self._info = None, None


def load_tree_file(path, map_location=None):
    """What QuintetCheckpointEngine.load returns for the file DeepSpeed names `path`: the state
    stored in its `.qtree` file, never an unpickled torch file."""
    ours = tree_path(path)
    if not ours.exists() and Path(path).exists():
        raise CheckpointError(f"{path} is a torch file, not written by quintet's engine, which never unpickles: "
                              "load it with DeepSpeed's stock checkpoint engine, if you trust it")
    state = read_tree(ours)
    if map_location is None or callable(map_location) or torch.device(map_location).type == "cpu":
        return state
    return _to_device(state, torch.device(map_location))


def _name_latest(info: CheckpointCommitInfo) -> None:
    if info.save_latest:
        atomic_write(Path(info.save_dir) / "latest", info.tag)


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return type(x)((k, _to_device(v, device)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def checked_options(options) -> dict:
    """The "quintet_checkpoint" section with defaults filled in; a clear error for anything else."""
    if not isinstance(options, dict):
        raise ValueError(f"{CONFIG_KEY} must be an object like {OPTIONS}, not {options!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown {CONFIG_KEY} options {unknown}; valid: {sorted(OPTIONS)}")
    opts = {**OPTIONS, **options}
    if not isinstance(opts["enabled"], bool):
        raise ValueError(f"{CONFIG_KEY}.enabled must be true or false, not {opts['enabled']!r}")
    for key in ("pool_mb", "chunk_mb", "timeout_s"):
        if not isinstance(opts[key], (int, float)) or isinstance(opts[key], bool) or opts[key] <= 0:
            raise ValueError(f"{CONFIG_KEY}.{key} must be a positive number, not {opts[key]!r}")
    return opts


def tree_path(path) -> Path:
    """Where the file DeepSpeed names `path` (`X.pt`) is stored: `X.qtree`."""
    path = Path(path)
    if path.suffix == TREE_SUFFIX:
        return path
    return path.with_suffix(TREE_SUFFIX) if path.suffix == ".pt" else path.with_name(path.name + TREE_SUFFIX)


def _find_tree_files(engine):
    """DeepSpeed's `_get_all_ckpt_names` (a glob for `*_model_states.pt`, whose results it checks
    exist), for `.qtree` files."""
    def names(checkpoints_path, tag):
        pattern = engine._get_ckpt_name(checkpoints_path, tag, mp_placeholder="*",
                                        pp_placeholder="0" if engine.load_universal_checkpoint() else None)
        return sorted(glob.glob(str(tree_path(pattern))))
    return names


def use_quintet_checkpoints(engine, **options):
    """Make a DeepSpeed engine save and load through QuintetCheckpointEngine (on every rank)."""
    opts = checked_options(options)
    if opts.pop("enabled"):
        old = engine.checkpoint_engine
        if old is not None and old.is_decoupled():
            old.cleanup()
        engine.checkpoint_engine = QuintetCheckpointEngine(engine._config, **opts)
        engine._get_all_ckpt_names = _find_tree_files(engine)
    return engine


def initialize(*args, config=None, **kwargs):
    """`deepspeed.initialize`, plus the config's "quintet_checkpoint" section (removed before
    DeepSpeed sees the config, checked before anything starts) choosing quintet's lazy engine."""
    import deepspeed

    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    config = dict(config or {})
    options = config.pop(CONFIG_KEY, None)
    if options is not None:
        checked_options(options)
    result = deepspeed.initialize(*args, config=config, **kwargs)
    if options is not None:
        use_quintet_checkpoints(result[0], **options)
    return result
