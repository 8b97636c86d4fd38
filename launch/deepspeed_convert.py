"""Convert a checkpoint written through quintet's DeepSpeed engine (`.qtree` files,
runtime/checkpoint/deepspeed_engine.py) for DeepSpeed's own tools, or into one fp32 file.

    python -m launch.deepspeed_convert stock CHECKPOINT_DIR OUT_DIR [--tag TAG]
    python -m launch.deepspeed_convert fp32 CHECKPOINT_DIR OUT.safetensors [--tag TAG]

`stock` writes DeepSpeed's stock layout — every file as the `torch.save` file DeepSpeed would
have written, `latest`, and DeepSpeed's recovery scripts — so that `zero_to_fp32.py`,
`ds_to_universal` and a stock DeepSpeed engine can read it. `fp32` consolidates the ZeRO
partitions into the model's full fp32 weights (through DeepSpeed's own zero_to_fp32 logic, on a
stock copy made in a temporary directory) and writes them as one safetensors file. The input is
read with quintet's reader, which never unpickles; CHECKPOINT_DIR is the save_dir given to
`save_checkpoint` (the tag defaults to its `latest`). Bad input exits 2 with one message.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from runtime.checkpoint.deepspeed_engine import TREE_SUFFIX
from runtime.checkpoint.format import CheckpointError
from runtime.checkpoint.tree import read_tree

EXIT_BAD_INPUT = 2


def tag_dir(checkpoint: Path, tag: str | None) -> tuple[Path, str]:
    """(the tag's directory, the tag): `tag`, else the one `latest` names."""
    if tag is None:
        latest = checkpoint / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{checkpoint} has no `latest` file: pass --tag")
        tag = latest.read_text().strip()
    if not tag or "/" in tag or tag in (".", ".."):
        raise CheckpointError(f"tag {tag!r} is not a directory name inside {checkpoint}")
    directory = checkpoint / tag
    if not any(directory.glob(f"*{TREE_SUFFIX}")):
        raise CheckpointError(f"{directory} holds no {TREE_SUFFIX} files written by quintet's DeepSpeed engine")
    return directory, tag


def to_stock(checkpoint: Path, out: Path, tag: str | None = None) -> Path:
    """Write the checkpoint in DeepSpeed's stock layout under `out`; returns the tag directory."""
    import deepspeed

    source, tag = tag_dir(checkpoint, tag)
    target = out / tag
    target.mkdir(parents=True, exist_ok=True)
    for tree in sorted(source.glob(f"*{TREE_SUFFIX}")):
        torch.save(read_tree(tree), target / (tree.name.removesuffix(TREE_SUFFIX) + ".pt"))
    scripts = Path(deepspeed.__file__).parent / "utils"
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        if (scripts / script).exists():
            shutil.copy(scripts / script, target / script)
    (out / "latest").write_text(tag)
    return target


def to_fp32_safetensors(checkpoint: Path, out: Path, tag: str | None = None) -> Path:
    """The model's consolidated fp32 weights as one safetensors file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="quintet-ds-") as tmp:
        stock = to_stock(checkpoint, Path(tmp), tag)
        if any(stock.glob("*optim_states.pt")):
            state = get_fp32_state_dict_from_zero_checkpoint(tmp, stock.name)
        else:  # no ZeRO: the model states file holds the full module
            (model_states,) = stock.glob("*model_states.pt")
            state = torch.load(model_states, weights_only=False)["module"]
    # safetensors stores each tensor once: no views sharing storage.
    tensors = {name: t.detach().float().contiguous().clone() for name, t in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt", "source": str(checkpoint)})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=("stock", "fp32"), help="stock: DeepSpeed's layout; fp32: one safetensors file")
    parser.add_argument("checkpoint", type=Path, help="the save_dir of DeepSpeed's save_checkpoint")
    parser.add_argument("out", type=Path, help="an output directory (stock) or .safetensors file (fp32)")
    parser.add_argument("--tag", default=None, help="the checkpoint's tag (default: the one `latest` names)")
    args = parser.parse_args(argv)
    try:
        path = (to_stock if args.kind == "stock" else to_fp32_safetensors)(args.checkpoint, args.out, args.tag)
    except (CheckpointError, OSError) as e:
        print(f"quintet: cannot convert {args.checkpoint}: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(path)


if __name__ == "__main__":
    main()
