"""A quintet checkpoint or a Hugging Face model folder as one model in this process: to evaluate,
inspect, generate or convert.

    from launch.load import load_checkpoint, load_hf
    model = load_checkpoint("runs/myrun")                 # its latest checkpoint, or a step directory
    model = load_hf("path/to/Qwen3-0.6B", torch.float64)  # config.json + safetensors
    from runtime.generate import generate
    tokens = generate(model, prompt, max_new_tokens=32)

A checkpoint of any layout and either engine loads (its blocks are reassembled into whole
tensors); a Hugging Face folder of any supported architecture (runtime/hf/config.py). Both give a
`runtime.model.Transformer` in eval mode on the CPU, its vocabulary unpadded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from launch import schema
from runtime.checkpoint.dcp_format import dcp_index, is_dcp_checkpoint, load_dcp_blocks
from runtime.checkpoint.format import (CheckpointError, MappedBlocks, StateBlock, dtype_named, load_blocks, read_index,
                                       row_slabs, verify_index_files)
from runtime.checkpoint.resume import candidates, read_trainer_state
from runtime.hf.checkpoint import HFFolder
from runtime.hf.config import model_fields
from runtime.model import ModelArgs, Transformer


def checkpoint_dir(path: Path) -> Path:
    """A step directory, or the one `latest` names under a run or checkpoints directory (a
    marker naming anything but a step directory beside it is refused)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "latest").exists():
            paths, problems = candidates(candidate)
            if problems:
                raise CheckpointError(problems[0][1])
            return paths[0]
    if (path / "trainer.json").exists():
        return path
    raise CheckpointError(f"{path} is neither a checkpoint (no trainer.json) nor a directory with a `latest` marker")


def model_config(values) -> DictConfig:
    """A model config of the schema (launch/schema.py ModelConfig) from a dict or config node."""
    schema.register()
    return OmegaConf.merge(OmegaConf.structured(schema.ModelConfig), values)


class Checkpoint:
    """One verified step directory: its model config, and any stored tensor whole."""

    def __init__(self, path: Path, config: Path | None = None):
        self.dir = checkpoint_dir(Path(path))
        self.trainer_state = read_trainer_state(self.dir)
        verify_index_files(self.dir, self.trainer_state.get("index_crc32"))
        self.dcp = is_dcp_checkpoint(self.dir)
        self.index = dcp_index(self.dir) if self.dcp else read_index(self.dir)
        self.run_config = self._run_config(config)
        self.mapped: MappedBlocks | None = None
        recorded = self.trainer_state.get("model")
        if config is None and isinstance(recorded, dict):
            self.model = model_config(recorded)
        elif self.run_config is not None:
            self.model = model_config(self.run_config.model)
        else:
            raise CheckpointError(f"{self.dir} records no model config and no run config is beside it: pass "
                                  "--config <run_dir>/config.yaml")

    def _run_config(self, explicit: Path | None):
        path = explicit or self.dir.parent.parent / "config.yaml"
        if explicit is not None and not path.exists():
            raise CheckpointError(f"no run config at {path}")
        return OmegaConf.load(path) if path.exists() else None

    def shape(self, key: str) -> tuple[list[int], torch.dtype]:
        entry = self.index[key][0]
        return list(entry["full_shape"]), entry["dtype"] if self.dcp else dtype_named(entry["dtype"])

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.index if k.startswith(prefix)]

    def load_into(self, blocks: list[StateBlock]) -> None:
        if self.dcp:
            load_dcp_blocks(self.dir, blocks, index=self.index)
        else:
            load_blocks(self.dir, blocks, index=self.index)

    def row_parts(self, key: str) -> list[torch.Tensor] | None:
        """The tensor `key` as CRC-checked views of the memory-mapped shard files, slab by slab,
        when its stored blocks are row slabs (quintet's format: a dim-0 split or whole); None
        otherwise (`read` it whole)."""
        slabs = None if self.dcp else row_slabs(self.index[key])
        if slabs is None:
            return None
        if self.mapped is None:
            self.mapped = MappedBlocks()
        return self.mapped.views(slabs)

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor `key` ("model/<name>", "buffer/<name>")."""
        shape, dtype = self.shape(key)
        block = StateBlock(key, torch.empty(shape, dtype=dtype), tuple(shape), tuple(slice(0, n) for n in shape))
        self.load_into([block])
        return block.local


def _empty_model(args: ModelArgs, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.to_empty(device="cpu")
    if args.tie_embeddings:  # to_empty gives each module its own copy
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def load_checkpoint(path, dtype: torch.dtype | None = None, config: Path | None = None) -> Transformer:
    """The model of a quintet checkpoint (a step directory, or a run / checkpoints directory: its
    latest), in the dtype it was saved in unless `dtype` says otherwise."""
    ckpt = Checkpoint(Path(path), config)
    keys = ckpt.keys("model/") + ckpt.keys("buffer/")
    model = _empty_model(ModelArgs.from_config(ckpt.model), dtype or ckpt.shape(keys[0])[1])
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(tensors) - {k.split("/", 1)[1] for k in keys})
    if missing:
        raise CheckpointError(f"{ckpt.dir} has no model/{missing[0]} (of {len(missing)} missing tensors)")
    blocks = []
    for key in keys:
        target = tensors.get(key.split("/", 1)[1])
        if target is None:
            raise CheckpointError(f"{ckpt.dir} has {key}, which the model of its config has not")
        shape, stored = ckpt.shape(key)
        if list(target.shape) != shape:
            raise CheckpointError(f"{key} has shape {tuple(shape)} in {ckpt.dir}, but {tuple(target.shape)} in its model")
        local = target.data if stored == target.dtype else torch.empty(shape, dtype=stored)
        blocks.append((target, StateBlock(key, local, tuple(shape), tuple(slice(0, n) for n in shape))))
    ckpt.load_into([b for _, b in blocks])
    with torch.no_grad():
        for target, block in blocks:
            if block.local is not target.data:
                target.copy_(block.local)
    return model


def hf_args(folder) -> ModelArgs:
    """The ModelArgs of a Hugging Face folder's config.json."""
    return ModelArgs.from_config(model_config(model_fields(json.loads((Path(folder) / "config.json").read_text()))))


def load_hf(folder, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model of a Hugging Face folder (config.json and safetensors), its tensors checked
    first (HFFolder.problems: missing, extra, misshapen, not floating point)."""
    args = hf_args(folder)
    source = HFFolder(folder, args)
    problems = source.problems()
    if problems:
        raise CheckpointError("; ".join(problems))
    model = _empty_model(args, dtype)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            t.copy_(source.values(name, t.shape, [tuple(slice(0, n) for n in t.shape)])[0])
    return model
