"""Compose the run config from `configs/` and overrides without Hydra's command line.

Used where a config is needed outside `launch.train`'s Hydra main: `launch.layout`, tests and
benchmarks. Gives exactly the config `python -m launch.train <overrides>` would run with.
"""
from __future__ import annotations

import enum
import functools
import json
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import MISSING, DictConfig, OmegaConf

from launch import env as launch_env
from launch import schema
from runtime.data.tokenizer import TokenizerError, tokenizer_vocab_size
from runtime.hf.config import model_fields

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def register() -> None:
    """The schema and resolvers the YAML files refer to (idempotent)."""
    schema.register()
    if not OmegaConf.has_resolver("quintet.default_run_dir"):
        OmegaConf.register_new_resolver("quintet.default_run_dir", launch_env.default_run_dir)
    if not OmegaConf.has_resolver("quintet.tokenizer_vocab"):
        OmegaConf.register_new_resolver("quintet.tokenizer_vocab", tokenizer_vocab)
    if not OmegaConf.has_resolver("quintet.hf"):
        OmegaConf.register_new_resolver("quintet.hf", hf_field)


def tokenizer_vocab(spec: str) -> int:
    """`${quintet.tokenizer_vocab:${data.tokenizer}}`: the vocabulary size of the run's tokenizer,
    which a model preset may take as its own (configs/model/tiny.yaml). 0 when the tokenizer
    cannot be loaded: launch.validate then says why, naming data.tokenizer."""
    try:
        return tokenizer_vocab_size(str(spec))
    except TokenizerError:
        return 0


@functools.lru_cache(maxsize=8)
def _hf_fields(folder: str) -> dict:
    return model_fields(json.loads((Path(folder) / "config.json").read_text()))


def hf_field(folder, key: str):
    """`${quintet.hf:${model.hf_path},KEY}` (configs/model/hf.yaml): the value of model.KEY for
    the Hugging Face model in `folder`, or the schema's default where its config.json says
    nothing of KEY. A placeholder when config.json cannot be read or run: launch.validate then
    says why (`hf_problems`) before it looks at anything else."""
    default = schema.ModelConfig()
    for part in key.split("."):
        default = getattr(default, part)
    try:
        value = _hf_fields(str(folder))
        for part in key.split("."):
            value = value[part]
    except (OSError, ValueError, KeyError, TypeError):
        if isinstance(default, enum.Enum):
            return default.value
        # A required size: any valid placeholder, since validation stops at hf_problems first.
        return 1 if default == MISSING or str(default).startswith("${") else default
    return value


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))
