"""Hugging Face import and export of a 1.24B-parameter model: quintet against transformers.

The model is Llama 3.2 1B's shape (configs/model/llama3_1b.yaml), random weights written once by
transformers' `save_pretrained` (fp32, 4.9 GB in 5 GB shards as it writes them). Each contender
runs in a fresh process; reported are its seconds and its peak memory:

- import: transformers' `from_pretrained(folder)`, against quintet's `model=hf` path in one
  rank and in four (tp=4): the meta-device model, `parallelize` and its materialisation from the
  folder, every rank reading only its slices (runtime/hf/). transformers 5 leaves the weights
  memory-mapped, read when first used; it is also timed with that first read (one pass over
  every weight). Target: a rank of four peaks at ≤ 0.35× one rank's memory; quintet's time
  ≤ 1.5× transformers'.
- export: transformers' `save_pretrained` of the model it loaded (its import not timed), against
  `launch.export` of the checkpoint the four ranks saved (streaming, --shard-size 1GB). quintet
  fsyncs each shard before naming it; save_pretrained does not, so it is also timed with the
  `os.sync()` that makes its files durable.

Each contender runs three times, each in a fresh process, in rounds (every contender once, then
again) so that all meet the same moments of a VM whose memory bandwidth varies severalfold from
one minute to the next; the figures are the medians. The page cache is flushed (`os.sync`)
before each run and each export's output deleted before it runs again, so the exports start
alike; the folder's pages stay cached (the machine has room), so imports read from memory.

Memory is the peak of the process's anonymous resident memory (RssAnon, sampled every 5 ms): what
it allocated. A memory-mapped safetensors file's pages are the kernel's page cache, shared and
dropped under pressure; the peak resident set (VmHWM, which counts them) is reported beside it.

    python -m benchmarks.hf_io           # ~10 minutes on 2 cores; needs ~12 GB of memory and disk
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import emit, median

REPO = Path(__file__).resolve().parent.parent


class PeakMemory:
    """Samples this process's RssAnon every 5 ms in a thread; `stop` gives (peak RssAnon, VmHWM) bytes."""

    def __init__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self._status("RssAnon"))
            time.sleep(0.005)

    def stop(self) -> tuple[int, int]:
        self.running = False
        self.thread.join()
        return max(self.peak, self._status("RssAnon")), self._status("VmHWM")


def make_folder(folder: Path) -> float:
    """The random model, saved by transformers; returns save_pretrained's seconds."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, rope_theta=500000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    start = time.perf_counter()
    model.save_pretrained(folder)
    seconds = time.perf_counter() - start
    from runtime.data.tokenizer import SAMPLE_TOKENIZER

    shutil.copyfile(SAMPLE_TOKENIZER, folder / "tokenizer.json")
    return seconds


def transformers_import(folder: str) -> dict:
    import torch
    import transformers

    memory = PeakMemory()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for p in model.parameters():  # the first use reads the mapped pages
            p.sum()
    read_seconds = time.perf_counter() - start
    anon, hwm = memory.stop()
    return {"seconds": seconds, "seconds_with_first_read": read_seconds, "peak_anon": anon, "peak_rss": hwm,
            "params": sum(p.numel() for p in model.parameters())}


def transformers_export(folder: str, out: str) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    memory = PeakMemory()
    start = time.perf_counter()
    model.save_pretrained(out)
    seconds = time.perf_counter() - start
    os.sync()
    synced = time.perf_counter() - start
    anon, hwm = memory.stop()
    return {"seconds": seconds, "seconds_durable": synced, "peak_anon": anon, "peak_rss": hwm}


def _import_rank(rank: int, world: int, folder: str, save: str | None) -> dict:
    """One rank of quintet's import (tp = world): parallelize materialises the model from the folder."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    from launch.config import compose
    from parallel.groups import build_groups
    from parallel.mesh import Topology
    from parallel.parallelize import parallelize
    from parallel.state import state_blocks
    from runtime.checkpoint.sync import SyncCheckpointer
    from runtime.model import ModelArgs, Transformer
    from runtime.trace import Tracer

    torch.set_num_threads(max(1, os.cpu_count() // world))
    cfg = compose(["model=hf", f"model.hf_path={folder}", f"parallel.tp={world}", "data=synthetic", "run_dir=unused"])
    groups = build_groups(Topology.from_config(cfg.parallel, world), "cpu", timeout_s=600)
    memory = PeakMemory()
    start = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_config(cfg.model, tp=world))
    par = parallelize(model, groups, cfg, torch.device("cpu"), Tracer(False, rank))
    seconds = time.perf_counter() - start
    anon, hwm = memory.stop()
    if save:
        saver = SyncCheckpointer(save, 1, rank, model=OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True))
        saver.request(1, state_blocks(par, SimpleNamespace(state={})), {"step": 1})
    return {"seconds": seconds, "peak_anon": anon, "peak_rss": hwm}


def quintet_import(folder: str, world: int, save: str | None) -> dict:
    from launch.spawn import run_ranks

    ranks = run_ranks(_import_rank, world, args=(folder, save), timeout_s=1800, pg_timeout_s=900)
    return {"seconds": max(r["seconds"] for r in ranks), "peak_anon": max(r["peak_anon"] for r in ranks),
            "peak_rss": max(r["peak_rss"] for r in ranks)}


def quintet_export(checkpoint: str, out: str) -> dict:
    from launch.export import export

    memory = PeakMemory()
    start = time.perf_counter()
    files = export(Path(checkpoint), Path(out), shard_bytes=10**9)
    seconds = time.perf_counter() - start
    anon, hwm = memory.stop()
    return {"seconds": seconds, "peak_anon": anon, "peak_rss": hwm, "shards": len(files)}


def child(kind: str, *args) -> dict:
    """Run one contender in a fresh interpreter; its JSON result."""
    os.sync()  # no contender pays for the previous one's writes
    proc = subprocess.run([sys.executable, "-m", "benchmarks.hf_io", "--child", kind, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rounds(contenders: dict, repeats: int) -> dict:
    """Each contender `repeats` times, in rounds (A B C, A B C, ...) so that all see the same
    moments of this VM, whose memory bandwidth varies severalfold from one minute to the next;
    the median of each figure. A contender is (kind, args, what to clear before it runs)."""
    runs: dict[str, list] = {key: [] for key in contenders}
    for _ in range(repeats):
        for key, (kind, args, clear) in contenders.items():
            if clear:
                shutil.rmtree(clear, ignore_errors=True)
            runs[key].append(child(kind, *args))
    return {key: {k: median([r[k] for r in rs]) for k in rs[0]} | {"runs": rs} for key, rs in runs.items()}


CHILDREN = {"transformers_import": transformers_import, "transformers_export": transformers_export,
            "quintet_import": lambda folder, world, save: quintet_import(folder, int(world), save or None),
            "quintet_export": quintet_export}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender (the median is reported)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return
    with tempfile.TemporaryDirectory(prefix="quintet-hf-io-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        folder = tmp / "llama"
        created_s = make_folder(folder)

        r = {"model_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
             "first_save_pretrained_s": created_s}
        ckpt, hf_out, q_out = tmp / "ckpt", tmp / "hf_out", tmp / "q_out"
        r |= rounds({"transformers_import": ("transformers_import", [str(folder)], None),
                     "quintet_import_1": ("quintet_import", [str(folder), "1", ""], None),
                     "quintet_import_4": ("quintet_import", [str(folder), "4", str(ckpt)], ckpt)}, args.repeats)
        r |= rounds({"transformers_export": ("transformers_export", [str(folder), str(hf_out)], hf_out),
                     "quintet_export": ("quintet_export", [str(ckpt), str(q_out)], q_out)}, args.repeats)
    gb = 1e9
    print(f"{'contender':34}{'seconds':>9}{'peak anon GB':>14}{'peak RSS GB':>13}")
    ti, te = r["transformers_import"], r["transformers_export"]
    rows = [("transformers from_pretrained", ti["seconds"], ti),
            ("  + first read of every weight", ti["seconds_with_first_read"], ti),
            ("quintet import, 1 rank", r["quintet_import_1"]["seconds"], r["quintet_import_1"]),
            ("quintet import, 4 ranks (tp=4)", r["quintet_import_4"]["seconds"], r["quintet_import_4"]),
            ("transformers save_pretrained", te["seconds"], te), ("  + os.sync (durable)", te["seconds_durable"], te),
            ("quintet export (durable)", r["quintet_export"]["seconds"], r["quintet_export"])]
    for name, seconds, x in rows:
        print(f"{name:34}{seconds:>9.1f}{x['peak_anon'] / gb:>14.2f}{x['peak_rss'] / gb:>13.2f}")
    r["ratios"] = {
        "import_memory_4_over_1": r["quintet_import_4"]["peak_anon"] / r["quintet_import_1"]["peak_anon"],
        "import_1_over_transformers_first_read": r["quintet_import_1"]["seconds"] / ti["seconds_with_first_read"],
        "import_4_over_transformers_first_read": r["quintet_import_4"]["seconds"] / ti["seconds_with_first_read"],
        "import_1_over_transformers_lazy": r["quintet_import_1"]["seconds"] / ti["seconds"],
        "export_over_transformers_durable": r["quintet_export"]["seconds"] / te["seconds_durable"],
        "export_over_transformers": r["quintet_export"]["seconds"] / te["seconds"],
    }
    for k, v in r["ratios"].items():
        print(f"{k:34}{v:>9.2f}")
    emit("hf_io", r)


if __name__ == "__main__":
    main()
