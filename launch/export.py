"""Export a checkpoint's model as a Hugging Face model folder that transformers loads.

    python -m launch.export runs/myrun out/                  # its latest checkpoint
    python -m launch.export runs/myrun/checkpoints/step_00001000 out/ --shard-size 2GB --dtype bfloat16

Reads either engine's files in any layout and writes `out/`: `config.json` of the matching
architecture (Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral or DeepSeek-V3: runtime/hf/config.py), with the context
length, RoPE settings and bos/eos ids; `generation_config.json`; the weights as safetensors
shards of at most --shard-size with `model.safetensors.index.json` (one `model.safetensors`
when they fit in one); and the run's tokenizer files. It streams: one tensor is read whole, turned
into Hugging Face's layout (runtime/hf/weights.py), and each shard is written as soon as it is
full, so memory is one shard plus one tensor, never the model. Everything goes to a temporary
folder beside OUT, renamed to OUT at the end; an existing non-empty OUT is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from omegaconf.errors import OmegaConfBaseException

from launch.load import Checkpoint
from runtime.checkpoint.format import CheckpointError
from runtime.data.tokenizer import SAMPLE_TOKENIZER, TokenizerError, load_tokenizer
from runtime.hf.config import HFConfigError, export_architecture, hf_config
from runtime.hf.files import Writer
from runtime.hf.weights import Zeros, sources, to_hf
from runtime.model import ModelArgs

EXIT_BAD_INPUT = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: a number of bytes, or one with KB, MB, GB or TB")
    scale = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}[(match.group(2) or "b").lower()]
    return int(float(match.group(1)) * scale)


def token_ids(ckpt: Checkpoint) -> tuple[int | None, int | None]:
    """(bos, eos): a Hugging Face import's own, where its config.json names them; the end of
    document of the run's tokenizer as eos otherwise."""
    bos = eos = None
    hf_path = ckpt.model.get("hf_path")
    if hf_path and (Path(hf_path) / "config.json").exists():
        original = json.loads((Path(hf_path) / "config.json").read_text())
        bos, eos = original.get("bos_token_id"), original.get("eos_token_id")
    if eos is None and ckpt.run_config is not None:
        try:
            eos = load_tokenizer(str(ckpt.run_config.data.tokenizer)).eod_id
        except TokenizerError:
            pass
    return bos, eos


def copy_tokenizer(ckpt: Checkpoint, out: Path) -> list[str]:
    """The run's tokenizer files into `out` (none for the byte tokenizer or a tiktoken file)."""
    if ckpt.run_config is None:
        return []
    spec = str(ckpt.run_config.data.tokenizer)
    path = SAMPLE_TOKENIZER if spec == "sample" else Path(spec)
    copied = []
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).exists():
                shutil.copyfile(path / name, out / name)
                copied.append(name)
    elif path.suffix == ".json" and path.exists():
        shutil.copyfile(path, out / "tokenizer.json")
        copied.append("tokenizer.json")
    elif path.suffix == ".model" and path.exists() and type(load_tokenizer(str(path))).__name__ == "SentencePieceTokenizer":
        shutil.copyfile(path, out / "tokenizer.model")
        copied.append("tokenizer.model")
    if copied and "tokenizer_config.json" not in copied:
        eod = load_tokenizer(spec).eod_id
        config = {"tokenizer_class": "PreTrainedTokenizerFast" if "tokenizer.json" in copied else "LlamaTokenizer"}
        if eod is not None and "tokenizer.json" in copied:
            from tokenizers import Tokenizer

            config["eos_token"] = Tokenizer.from_file(str(out / "tokenizer.json")).id_to_token(eod)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied.append("tokenizer_config.json")
    return copied


def max_positions(ckpt: Checkpoint) -> int:
    try:
        return int(ckpt.model.max_position_embeddings)
    except OmegaConfBaseException:  # recorded before the key existed: the run's sequence length
        if ckpt.run_config is None:
            raise CheckpointError("the checkpoint records no model.max_position_embeddings and no run config is "
                                  "beside it: pass --config <run_dir>/config.yaml") from None
        return int(ckpt.run_config.train.seq_len)


def export(checkpoint: Path, out: Path, config: Path | None = None, shard_bytes: int = 5 * 10**9,
           dtype: torch.dtype | None = None) -> list[Path]:
    """Write the Hugging Face folder `out` for a checkpoint; returns its safetensors files."""
    ckpt = Checkpoint(checkpoint, config)
    m = ckpt.model
    arch = export_architecture(m)  # refuses what has no transformers architecture, before any work
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: export into a new folder")
    args = ModelArgs.from_config(m)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with Writer(tmp, shard_bytes, metadata={"source": str(ckpt.dir)}) as writer:
            stored = None
            for name, src in sources(args, arch).items():
                if isinstance(src, Zeros):  # quintet-only state: exportable only while it is still zero
                    bias = ckpt.read(f"buffer/{name}")
                    if bool(bias.any()):
                        raise CheckpointError(f"buffer/{name} is not zero (model.moe.bias_update_rate moved the "
                                              "routing bias): transformers' Mixtral and Qwen3-MoE have no such bias")
                    continue
                # Row slabs straight from the mapped files where the layouts agree; else the
                # tensor read whole (one at a time). DeepSeek-V3's routing bias is a buffer.
                key = f"buffer/{name}" if name.endswith("expert_bias") else f"model/{name}"
                parts = ckpt.row_parts(key)
                tensors = to_hf(src, [p.to(dtype or p.dtype) for p in parts]) if parts else None
                if tensors is None:
                    parts = [ckpt.read(key)]
                    tensors = to_hf(src, [p.to(dtype or p.dtype) for p in parts])
                stored = stored or parts[0].dtype
                for hf_name, slabs in tensors:
                    writer.add(hf_name, slabs)
            files = writer.close()
        bos, eos = token_ids(ckpt)
        dtype_name = str(dtype or stored).removeprefix("torch.")
        config_json = hf_config(m, dtype_name, max_positions(ckpt), bos, eos)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        generation = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        copy_tokenizer(ckpt, tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / f.name for f in files]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a step directory, or a run/checkpoints directory (its latest)")
    parser.add_argument("out", type=Path, help="the Hugging Face folder to write (new, or empty)")
    parser.add_argument("--config", type=Path, default=None, help="the run's config.yaml (default: beside the run)")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"),
                        help="largest safetensors shard (default 5GB, as save_pretrained)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights' dtype (default: as saved)")
    args = parser.parse_args(argv)
    try:
        files = export(args.checkpoint, args.out, args.config, args.shard_size, DTYPES.get(args.dtype))
    except (CheckpointError, HFConfigError, KeyError) as e:
        print(f"quintet: cannot export {args.checkpoint}: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as e:
        print(f"quintet: cannot export {args.checkpoint} to {args.out}: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print("\n".join(str(f) for f in files))


if __name__ == "__main__":
    main()
