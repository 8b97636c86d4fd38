"""Nested state dicts (DeepSpeed's checkpoint files) as tensors plus tagged JSON, never pickle.

A file holds the tensors' raw bytes back to back, then a JSON index, then a 16-byte footer (the
index's length, little-endian, and a magic). The index has the tree: plain JSON scalars as
themselves, everything else as an object tagged by "$":

    {"$": "tensor", "i": 3}              the 4th tensor of `tensors` (dtype, shape, offset, CRC32)
    {"$": "dict" | "odict", "items": [[key, value], ...]}   keys of any supported type, in order
    {"$": "list" | "tuple" | "set" | "size", "v": [...]}
    {"$": "dtype", "v": "float32"}
    {"$": "namespace" | "simplenamespace", "v": {...}}     argparse.Namespace, types.SimpleNamespace
    {"$": "path", "v": "/a/b"}                             a pathlib path
    {"$": "enum", "cls": "pkg.mod.Class", "v": 1}
    {"$": "obj", "cls": "pkg.mod.Class", "state": {...}}    the object's __dict__

Namespaces (what Megatron-DeepSpeed stores as `client_state["args"]`) and paths are plain data:
their attributes are stored and they are rebuilt as what they were. Other classes are rebuilt
only when they are in ALLOWED (DeepSpeed's loss scalers, ZeRO's fragment addresses and stage
enum): loading can build nothing else, so an untrusted file cannot run code. Saving anything
else fails at once with the key path and type.
"""
from __future__ import annotations

import argparse
import enum
import importlib
import json
import struct
import types
import zlib
from collections import OrderedDict
from pathlib import Path, PurePath

import torch

from runtime.checkpoint.format import CheckpointError, dtype_named, from_bytes

FORMAT = "quintet-tree-1"
MAGIC = b"QNTTREE1"
ALLOWED = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
_SEQUENCES = {list: "list", tuple: "tuple", set: "set", torch.Size: "size"}
_NAMESPACES = {argparse.Namespace: "namespace", types.SimpleNamespace: "simplenamespace"}


def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def flatten(obj, path: str = "") -> tuple[object, list[torch.Tensor]]:
    """(JSON-able tree, tensors in the order the tree refers to them)."""
    tensors: list[torch.Tensor] = []

    def enc(x, at):
        if x is None or isinstance(x, (bool, str)) or type(x) in (int, float):
            return x
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return {"$": "tensor", "i": len(tensors) - 1}
        if isinstance(x, torch.dtype):
            return {"$": "dtype", "v": str(x).removeprefix("torch.")}
        if type(x) in (dict, OrderedDict):
            return {"$": "odict" if type(x) is OrderedDict else "dict",
                    "items": [[enc(k, f"{at}[{k!r}] (key)"), enc(v, f"{at}[{k!r}]")] for k, v in x.items()]}
        if type(x) in _SEQUENCES:
            items = sorted(x, key=repr) if isinstance(x, set) else x  # a set's order is not stable
            return {"$": _SEQUENCES[type(x)], "v": [enc(v, f"{at}[{i}]") for i, v in enumerate(items)]}
        if type(x) in _NAMESPACES:
            return {"$": _NAMESPACES[type(x)], "v": enc(dict(vars(x)), f"{at}.__dict__")}
        if isinstance(x, PurePath):
            return {"$": "path", "v": str(x)}
        name = _class_name(type(x))
        if name in ALLOWED and isinstance(x, enum.Enum):
            return {"$": "enum", "cls": name, "v": x.value}
        if name in ALLOWED:
            return {"$": "obj", "cls": name, "state": enc(dict(vars(x)), f"{at}.__dict__")}
        if isinstance(x, float):  # numpy's float64 and the like
            return float(x)
        raise TypeError(f"cannot checkpoint {at or 'the state'}: a {name} is neither a tensor, a plain "
                        f"value (None, bool, int, float, str, dtype), a dict/list/tuple/set of those, nor "
                        f"one of {sorted(ALLOWED)}; convert it to plain values first")

    return enc(obj, path), tensors


def _allowed_class(name: str):
    if name not in ALLOWED:
        raise CheckpointError(f"the checkpoint asks for class {name!r}, which is not allowed "
                              f"(allowed: {sorted(ALLOWED)}); refusing to build it")
    module, _, qualname = name.rpartition(".")
    return getattr(importlib.import_module(module), qualname)


def unflatten(tree, tensors: list[torch.Tensor]):
    def dec(x):
        if not isinstance(x, dict):
            return x
        tag = x.get("$")
        if tag == "tensor":
            return tensors[x["i"]]
        if tag in ("dict", "odict"):
            return (OrderedDict if tag == "odict" else dict)((dec(k), dec(v)) for k, v in x["items"])
        if tag in ("list", "tuple", "set", "size"):
            return {"list": list, "tuple": tuple, "set": set, "size": torch.Size}[tag](dec(v) for v in x["v"])
        if tag == "dtype":
            return dtype_named(x["v"])
        if tag == "namespace":
            return argparse.Namespace(**{str(k): v for k, v in dec(x["v"]).items()})
        if tag == "simplenamespace":
            return types.SimpleNamespace(**{str(k): v for k, v in dec(x["v"]).items()})
        if tag == "path":
            return Path(str(x["v"]))
        if tag == "enum":
            return _allowed_class(x["cls"])(x["v"])
        if tag == "obj":
            cls = _allowed_class(x["cls"])
            obj = cls.__new__(cls)
            obj.__dict__.update(dec(x["state"]))
            return obj
        raise CheckpointError(f"unknown tag {tag!r} in a {FORMAT} index")

    return dec(tree)


def write_index(tree, f, entries: list[dict]) -> None:
    """Append the JSON index and the footer to `f`, after the tensors' bytes (a FileJob finish)."""
    index = json.dumps({"format": FORMAT, "tree": tree, "tensors": entries}).encode()
    f.write(index)
    f.write(struct.pack("<Q", len(index)) + MAGIC)


def read_tree(path: str | Path):
    """The state dict stored at `path`, every tensor's checksum verified; CheckpointError naming
    the file for anything else (another format, a truncated or altered file)."""
    path = Path(path)
    try:
        return _read_tree(path)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its {FORMAT} index is corrupt ({type(e).__name__}: {e})") from None


def _read_tree(path: Path):
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        if size < 16:
            raise CheckpointError(f"{path} is too short to be a {FORMAT} file")
        f.seek(size - 16)
        length, magic = struct.unpack("<Q", f.read(8))[0], f.read(8)
        if magic != MAGIC or length > size - 16:
            raise CheckpointError(f"{path} is not a {FORMAT} file (no footer; written by another engine, "
                                  f"e.g. torch.save?): quintet does not unpickle checkpoints")
        f.seek(size - 16 - length)
        index = json.loads(f.read(length))
        tensors = []
        for e in index["tensors"]:
            f.seek(e["offset"])
            raw = f.read(e["nbytes"])
            if len(raw) != e["nbytes"] or zlib.crc32(raw) != e["crc32"]:
                raise CheckpointError(f"{path}: tensor {len(tensors)} at byte {e['offset']} is corrupt "
                                      f"(checksum mismatch or short read); the checkpoint cannot be used")
            tensors.append(from_bytes(raw, e["dtype"], e["shape"]))
    return unflatten(index["tree"], tensors)
