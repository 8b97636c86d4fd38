"""A Hugging Face model folder as the initial values of a quintet model, in any layout.

    folder = HFFolder("DIR", args)       # args: the ModelArgs built from DIR/config.json
    folder.problems()                    # every missing, extra, misshapen or unusable tensor
    folder.values(name, full_shape, blocks)   # what parallel/materialize.py asks for

`values` reads, for each rectangle of a parameter this rank holds, only those rows and columns
(runtime/hf/files.py), converted to quintet's layout (runtime/hf/weights.py). Parameters a
Hugging Face checkpoint does not have (multi-token prediction's blocks, which transformers
does not load) come from `fallback`, the model's own initial values.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from runtime.hf.config import architecture
from runtime.hf.files import HFFilesError, Reader
from runtime.hf.weights import hf_shapes, read_block, sources
from runtime.model import ModelArgs

# safetensors dtypes a floating-point parameter can be loaded from.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class HFFolder:
    def __init__(self, folder, args: ModelArgs, fallback=None):
        self.folder, self.args, self.fallback = Path(folder), args, fallback
        self.arch = architecture(json.loads((self.folder / "config.json").read_text()))
        self.sources = sources(args, self.arch)
        self.reader = Reader(self.folder)

    def problems(self, limit: int = 8) -> list[str]:
        """What makes the folder's tensors unusable for this model, each naming the tensor (the
        first `limit` of each kind)."""
        expected = hf_shapes(self.args, self.arch)
        stored = set(self.reader.files)
        out = []
        missing = [n for n in expected if n not in stored]
        # DeepSeek-V3's releases carry their MTP block as layer n_layers, which transformers skips.
        skipped = re.compile(rf"model\.layers\.(\d+)\.")
        extra = sorted(n for n in stored - set(expected)
                       if not (self.arch == "deepseek_v3" and (m := skipped.match(n)) and int(m[1]) >= self.args.n_layers))
        if missing:
            out.append(f"{self.folder} lacks {len(missing)} tensor(s) the {self.arch} model of its config.json has: "
                       f"{', '.join(missing[:limit])}")
        if extra:
            out.append(f"{self.folder} has {len(extra)} tensor(s) its {self.arch} config.json does not explain: "
                       f"{', '.join(extra[:limit])}")
        wrong = []
        for name, shape in expected.items():
            if name not in stored:
                continue
            try:
                got, dtype = self.reader.info(name)
            except HFFilesError as e:
                out.append(str(e))
                continue
            if got != shape:
                wrong.append(f"{name} is {list(got)}, expected {list(shape)}")
            elif dtype not in FLOAT_DTYPES:
                wrong.append(f"{name} is stored as {dtype}, not a floating-point type ({', '.join(FLOAT_DTYPES)})")
        if wrong:
            out.append(f"{self.folder}: " + "; ".join(wrong[:limit]) + (f" (and {len(wrong) - limit} more)"
                                                                          if len(wrong) > limit else ""))
        return out

    def values(self, name: str, full_shape, blocks) -> list[torch.Tensor]:
        src = self.sources.get(name)
        if src is None:
            return self.fallback(name, full_shape, blocks)
        return [read_block(src, self.reader, tuple(full_shape), block) for block in blocks]
