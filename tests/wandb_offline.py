"""Read the history of an offline wandb run from its `.wandb` file, without a server.

The file is a 7-byte header (":W&B", magic 0xBEE1, version) followed by a LevelDB-style log:
32 KiB blocks of records, each with a 7-byte header (crc32c, little-endian length, type
FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) and a protobuf `Record` payload.
"""
from __future__ import annotations

import json
from pathlib import Path

BLOCK, HEADER = 32768, 7


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a .wandb file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer: zero padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += room
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload


def _records(run_dir: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    for payload in _payloads(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _items(items) -> dict:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def offline_history(run_dir: str | Path) -> list[dict]:
    """Every history row logged to the (single) offline run under `run_dir/wandb`."""
    return [_items(r.history.item) for r in _records(run_dir) if r.WhichOneof("record_type") == "history"]


def offline_configs(run_dir: str | Path) -> list[dict]:
    """Every config the run sent: in its run record and in config updates."""
    configs = []
    for r in _records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run" and r.run.config.update:
            configs.append(_items(r.run.config.update))
        elif kind == "config":
            configs.append(_items(r.config.update))
    return configs
