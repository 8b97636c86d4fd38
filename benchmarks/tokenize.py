"""launch.tokenize against the tokenizers library's own encode_batch, and its memory at two corpus sizes.

A JSONL corpus is made from the sample corpus's documents (each a random slice of one, so that
no two documents are the same text), 50 MB and 200 MB. The contenders, with the BPE shipped
with quintet, on every core:

- `encode_batch`: the texts already in memory (decoded from the same JSONL beforehand, not
  timed), handed to `tokenizers.Tokenizer.encode_batch` in batches of 1,000, its own thread
  pool on every core: tokenization alone, the physical bound for this tokenizer;
- `launch.tokenize`: `python -m launch.tokenize --workers <cores>` on the JSONL file, end to end
  (reading, JSON decoding, tokenizing, writing .bin/.idx), as a user runs it.

Reported: tokens/s of each and their ratio (target ≥ 0.8), and launch.tokenize's peak resident
memory (the sum over its processes, sampled every 50 ms) at 50 MB and at 200 MB (target: the
larger ≤ 1.2× the smaller, memory flat in the corpus size).

    python -m benchmarks.tokenize            # 50 MB and 200 MB (~3 minutes on 2 cores)
    python -m benchmarks.tokenize --quick    # 10 MB and 40 MB
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import emit
from runtime.data.sources import sample_documents
from runtime.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    """A JSONL file of about `megabytes` MB of documents; returns the number of documents."""
    docs, g = sample_documents(), np.random.default_rng(seed)
    written = n = 0
    with open(path, "w") as f:
        while written < megabytes * 1e6:
            d = docs[g.integers(len(docs))]
            start = int(g.integers(0, max(len(d) - 200, 1)))
            line = json.dumps({"text": d[start:start + int(g.integers(200, 4000))]}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def encode_batch_rate(path: Path) -> dict:
    tok = load_tokenizer("sample").tok
    texts = [json.loads(line)["text"] for line in open(path)]
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 1000], add_special_tokens=False))
    seconds = time.perf_counter() - start
    return {"tokens": tokens + len(texts), "seconds": seconds, "tokens_per_s": (tokens + len(texts)) / seconds}


def peak_rss(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for `proc`; (peak of the summed RSS of it and its children, wall seconds)."""
    peak, start, parent = 0, time.perf_counter(), psutil.Process(proc.pid)

    def sample():
        nonlocal peak
        while proc.poll() is None:
            try:
                procs = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t.start()
    proc.wait()
    t.join()
    return peak, time.perf_counter() - start


def launch_tokenize(path: Path, out: Path) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "launch.tokenize", "--tokenizer", "sample", "--out", str(out),
                             "--workers", str(os.cpu_count()), str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    rss, seconds = peak_rss(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"launch.tokenize exited {proc.returncode}")
    tokens = json.loads(Path(f"{out}.bin.json").read_text())["tokens"]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_rss_mb": rss / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    small, large = (10, 40) if args.quick else (50, 200)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mb in (small, large):
            corpus = Path(tmp) / f"corpus{mb}.jsonl"
            docs = write_corpus(corpus, mb)
            ours = launch_tokenize(corpus, Path(tmp) / f"out{mb}")
            results[f"{mb}MB"] = {"documents": docs, "input_mb": corpus.stat().st_size / 1e6, "launch.tokenize": ours}
            if mb == large:
                results[f"{mb}MB"]["encode_batch"] = ref = encode_batch_rate(corpus)
                assert ref["tokens"] == ours["tokens"], "the contenders did not produce the same tokens"
            for f in Path(tmp).glob(f"out{mb}*"):
                f.unlink()
    big = results[f"{large}MB"]
    ratio = big["launch.tokenize"]["tokens_per_s"] / big["encode_batch"]["tokens_per_s"]
    memory = big["launch.tokenize"]["peak_rss_mb"] / results[f"{small}MB"]["launch.tokenize"]["peak_rss_mb"]
    print(f"{'contender':24}{'tokens/s':>14}{'seconds':>10}{'peak RSS MB':>14}")
    print(f"{'encode_batch':24}{big['encode_batch']['tokens_per_s']:>14,.0f}{big['encode_batch']['seconds']:>10.1f}")
    for mb in (small, large):
        r = results[f"{mb}MB"]["launch.tokenize"]
        print(f"{f'launch.tokenize {mb} MB':24}{r['tokens_per_s']:>14,.0f}{r['seconds']:>10.1f}{r['peak_rss_mb']:>14,.0f}")
    print(f"launch.tokenize / encode_batch at {large} MB: {ratio:.2f} (target ≥ 0.8); peak memory {large} MB / "
          f"{small} MB: {memory:.2f} (target ≤ 1.2)")
    emit("tokenize", {"tokenizer": "sample (BPE, 1,024 ids)", "workers": os.cpu_count(), "results": results,
                      "summary": {"throughput_ratio": round(ratio, 3), "memory_ratio": round(memory, 3)}})


if __name__ == "__main__":
    main()
