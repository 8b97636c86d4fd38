"""Resuming a run: which checkpoint, whether it was written for this model, and falling back
past checkpoints that do not verify.

Candidates are the step directory `latest` names, then every older committed one (those with
a trainer.json), newest first. For each, every rank reads trainer.json, checks the index files
against the checksums it records, and reads the index; all agree that they could (one small all-gather of error messages), then compare the stored tensors —
names and full shapes — with the model's over all ranks: a checkpoint of another model is
refused outright (`CheckpointMismatch`), never loaded in part. Then every rank reads the blocks
it needs, every byte checked against its CRC32, and all agree again. A candidate that fails is
skipped, with its reason, when `checkpoint.fallback` is on; otherwise its error stops the run.
Every rank reaches the same verdict, so every rank exits the same way.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from runtime.checkpoint.dcp_format import dcp_index, is_dcp_checkpoint, load_dcp_blocks
from runtime.checkpoint.format import (CheckpointError, CheckpointMismatch, load_blocks, read_index, read_json,
                                       verify_index_files)

STEP_DIR = re.compile(r"step_(\d{8})")
SHOWN = 6  # tensor names a mismatch message lists


@dataclass
class Resumed:
    path: Path
    trainer_state: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (step directory, why)


def read_trainer_state(path: Path) -> dict:
    """trainer.json of a step directory, checked: a step count and the token count."""
    state = read_json(path / "trainer.json")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"{path / 'trainer.json'}: step {state.get('step')!r} is not a step count")
    return state


def candidates(directory: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(committed step directories to try, newest first from the one `latest` names; problems
    with the marker or with directories it names, as (name, why))."""
    marker = directory / "latest"
    if not marker.exists():
        return [], []
    committed = sorted((p for p in directory.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "trainer.json").exists()),
                       reverse=True)
    problems = []
    try:
        name = marker.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        name, why = None, f"{marker} cannot be read ({e})"
    else:
        why = None if STEP_DIR.fullmatch(name) else f"{marker} names {name[:80]!r}, which is not a step directory"
    if why is None and not (directory / name / "trainer.json").exists():
        why = f"{directory / name} has no trainer.json: the checkpoint is incomplete"
    if why is not None:
        problems.append((name or "latest", why))
        return committed, problems
    return [p for p in committed if p.name <= name], problems


def _agree(error: str | None) -> str | None:
    """The first rank's error, on every rank (None when no rank has one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _stored_shapes(path: Path) -> tuple[bool, dict]:
    """(written by the dcp_async engine, key -> stored blocks) of a step directory."""
    dcp = is_dcp_checkpoint(path)
    return dcp, dcp_index(path) if dcp else read_index(path)


def check_fits(path: Path, index: dict, blocks, recorded_model: dict | None, model: dict | None) -> None:
    """CheckpointMismatch unless the checkpoint holds exactly this model's tensors (names and
    full shapes over every rank). The message names the model settings that differ."""
    mine = {b.key: list(b.full_shape) for b in blocks}
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        mine = {k: v for shapes in everyone for k, v in shapes.items()}
    stored = {k: list(entries[0]["full_shape"]) for k, entries in index.items()}
    extra, missing = sorted(set(stored) - set(mine)), sorted(set(mine) - set(stored))
    reshaped = sorted(k for k in set(stored) & set(mine) if stored[k] != mine[k])
    if not (extra or missing or reshaped):
        return
    parts = []
    if recorded_model and model:
        differ = [f"model.{k}: {_show(recorded_model.get(k))} there, {_show(model.get(k))} here"
                  for k in sorted(set(recorded_model) | set(model)) if k != "name" and recorded_model.get(k) != model.get(k)]
        if differ:
            parts.append("; ".join(differ))
    def listed(keys, show):
        return ", ".join(show(k) for k in keys[:SHOWN]) + (", …" if len(keys) > SHOWN else "")

    if extra:
        parts.append(f"it holds tensors this model lacks: {listed(extra, lambda k: f'{k} {stored[k]}')}")
    if missing:
        parts.append(f"it lacks tensors of this model: {listed(missing, lambda k: f'{k} {mine[k]}')}")
    if reshaped:
        parts.append(f"tensors differ in shape: {listed(reshaped, lambda k: f'{k} {stored[k]} there, {mine[k]} here')}")
    raise CheckpointMismatch(
        f"{path} was written for another model ({'; '.join(parts)}). Resume with the model it was written for, or "
        f"train this model in a new run_dir (or checkpoint.dir); the checkpoints there are kept as they are")


def _show(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def resume(checkpointer, blocks: list, fallback: bool) -> Resumed | None:
    """Load the newest checkpoint of `checkpointer.dir` that verifies into `blocks` (this rank's
    StateBlocks, the optimizer's state already created; collective). None when there is none;
    CheckpointError when checkpoints exist but none can be used (or the newest cannot, without
    `fallback`)."""
    paths, skipped = candidates(checkpointer.dir)
    if skipped and not fallback:
        raise CheckpointError(skipped[0][1] + "; with checkpoint.fallback=true the newest one that verifies is used")
    for path in paths:
        error = None
        try:
            trainer_state = read_trainer_state(path)
            verify_index_files(path, trainer_state.get("index_crc32"))
            dcp, index = _stored_shapes(path)
        except CheckpointError as e:
            error = str(e)
        error = _agree(error)
        if error is None:
            check_fits(path, index, blocks, trainer_state.get("model"), checkpointer.model)
            try:
                if dcp:
                    load_dcp_blocks(path, blocks, index)
                else:
                    load_blocks(path, blocks, index)
            except CheckpointError as e:
                error = str(e)
            error = _agree(error)
        if error is None:
            return Resumed(path, trainer_state, skipped)
        if not fallback:
            raise CheckpointError(f"{error}; with checkpoint.fallback=true the newest checkpoint that verifies is used")
        skipped.append((path.name, error))
    if skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise CheckpointError(f"no checkpoint in {checkpointer.dir} verifies ({reasons}). Restore them from a copy, "
                              "or start over in a new run_dir")
    return None
