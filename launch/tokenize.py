"""Tokenize a corpus into Megatron's indexed format (PREFIX.bin + PREFIX.idx), or train a tokenizer.

    python -m launch.tokenize --tokenizer sample --out data/py INPUT...     # .txt .jsonl(.gz/.zst) .parquet, dataset dirs
    python -m launch.tokenize --tokenizer gpt2/tokenizer.json --field content --workers 8 --out data/code code/*.jsonl.zst
    python -m launch.tokenize --train-vocab 8192 --tokenizer my_bpe.json corpus/*.jsonl   # train a byte-level BPE
    python -m launch.train data=indexed data.path=data/py

Each document becomes its tokenizer's ids followed by the end-of-document id, one sequence of
the indexed dataset (ids as uint16 when the vocabulary has at most 65,536, else int32); beside
`.bin` goes `.bin.json` with the id range, so that a run need not scan the file. Reading and
tokenizing run in `--workers` processes (default: every core) on blocks of about a megabyte,
written in input order, so the output does not depend on the worker count and memory stays flat
whatever the corpus size. Nothing is left that a run would take for complete: the files are
written under temporary names and renamed at the end. A record that is not a document (text that
is not UTF-8, a line that is not JSON or lacks the field, a row without text, an empty document)
stops with its file and line and exit code 2; `--skip-bad` counts and skips them instead.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from runtime.data.indexed import IndexedWriter, token_dtype
from runtime.data.readers import BadRecord, blocks, documents, input_size, kind_of
from runtime.data.sources import write_sidecar
from runtime.data.tokenizer import TokenizerError, load_tokenizer, train_bpe

EXIT_BAD_INPUT = 2
_worker: dict = {}


def _init_worker(spec: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the workers are the parallelism
    _worker["tokenizer"] = load_tokenizer(spec)


def encode_block(block, spec: str | None = None):
    """(ids of every document of the block, each followed by the end-of-document id, as one
    array; their lengths; the block's problems; the input it consumed)."""
    tok = _worker["tokenizer"] if spec is None else load_tokenizer(spec)
    texts, problems = documents(block)
    encoded = tok.encode_batch(texts) if texts else []
    lengths = np.array([len(ids) + 1 for ids in encoded], np.int64)
    flat = np.empty(int(lengths.sum()), np.int64)
    ends = np.cumsum(lengths)
    for ids, end, n in zip(encoded, ends, lengths):
        flat[end - n:end - 1] = ids
        flat[end - 1] = tok.eod_id
    return flat, lengths, problems, block.consumed


class Progress:
    """One line on stderr, redrawn at most twice a second: input done, tokens/s, ETA."""

    def __init__(self, total: int, unit: str):
        self.total, self.unit, self.done, self.tokens = max(total, 1), unit, 0, 0
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, consumed: int, tokens: int, final: bool = False) -> None:
        self.done += consumed
        self.tokens += tokens
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.tty else 10):
            return
        self.last, elapsed = now, max(now - self.start, 1e-9)
        share = min(self.done / self.total, 1.0)
        eta = elapsed * (1 - share) / share if share > 0 else float("inf")
        done = f"{self.done / 2**20:,.1f} MiB" if self.unit == "bytes" else f"{self.done:,} rows"
        line = f"{share:6.1%}  {done}  {self.tokens:,} tokens  {self.tokens / elapsed:,.0f} tokens/s"
        line += f"  eta {eta:,.0f}s" if eta != float("inf") else ""
        sys.stderr.write(("\r\033[K" if self.tty else "") + line + ("\n" if final or not self.tty else ""))
        sys.stderr.flush()


def tokenize(inputs: list[str], spec: str, out: str, text_field: str = "text", workers: int = 1,
             skip_bad: bool = False, progress: bool = True) -> dict:
    """Write the indexed dataset `out` (.bin/.idx) from `inputs`; returns what was written.
    BadRecord names the first bad record (without `skip_bad`); nothing is left at `out` then."""
    tok = load_tokenizer(spec)
    if tok.eod_id is None:
        raise TokenizerError(f"--tokenizer {spec} has no end-of-document token to append after each document")
    dtype = token_dtype(tok.vocab_size)
    units = {kind_of(p) == "dataset" for p in inputs}
    meter = Progress(sum(input_size(p) for p in inputs), "rows" if units == {True} else "bytes")
    skipped, first_skipped, docs, low, high = 0, None, 0, None, None

    def write(result) -> None:
        nonlocal skipped, first_skipped, docs, low, high
        flat, lengths, problems, consumed = result
        if problems and not skip_bad:
            raise BadRecord(problems[0] + " (--skip-bad counts and skips such records)")
        skipped += len(problems)
        first_skipped = first_skipped or (problems[0] if problems else None)
        ends = np.cumsum(lengths)
        for end, n in zip(ends, lengths):
            writer.add_document(flat[end - n:end])
        docs += len(lengths)
        if flat.size:
            low = int(flat.min()) if low is None else min(low, int(flat.min()))
            high = int(flat.max()) if high is None else max(high, int(flat.max()))
        if progress:
            meter.update(consumed, int(flat.size))

    source = (b for path in inputs for b in blocks(path, text_field))
    with IndexedWriter(out, dtype) as writer:
        if workers <= 1:
            for block in source:
                write(encode_block(block, spec))
        else:
            # fork: the workers inherit the imported modules; at most 2 blocks per worker wait.
            with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
                pending: deque = deque()
                for block in source:
                    pending.append(pool.apply_async(encode_block, (block,)))
                    if len(pending) >= 2 * workers:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())
        tokens = writer.tokens
    if progress:
        meter.update(0, 0, final=True)
    write_sidecar(out + ".bin", tokens, low or 0, -1 if high is None else high, str(spec))
    return {"documents": docs, "tokens": tokens, "skipped": skipped, "first_skipped": first_skipped,
            "dtype": dtype.name, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}


def train_tokenizer(inputs: list[str], vocab_size: int, out: str, text_field: str, skip_bad: bool) -> None:
    def texts():
        for path in inputs:
            for block in blocks(path, text_field):
                found, problems = documents(block)
                if problems and not skip_bad:
                    raise BadRecord(problems[0] + " (--skip-bad counts and skips such records)")
                yield from found

    tok = train_bpe(texts(), vocab_size, out)
    print(f"trained a byte-level BPE tokenizer of {tok.vocab_size:,} ids (end of document: {tok.eod_id}) -> {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=".txt, .jsonl(.gz/.zst), .parquet files or save_to_disk folders")
    parser.add_argument("--tokenizer", default="sample", help="bytes | sample | tokenizer.json | SentencePiece .model | "
                        "tiktoken file | a folder holding tokenizer.json; with --train-vocab, where to write it")
    parser.add_argument("--out", help="the indexed dataset's PREFIX (writes PREFIX.bin, PREFIX.idx, PREFIX.bin.json)")
    parser.add_argument("--field", default="text", help="the JSON field or column holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core)")
    parser.add_argument("--skip-bad", action="store_true", help="skip records that are not documents, and count them")
    parser.add_argument("--train-vocab", type=int, metavar="N", help="first train a byte-level BPE of N ids on the inputs")
    args = parser.parse_args(argv)
    missing = [p for p in args.inputs if not Path(p).exists()]
    if missing:
        parser.error(f"no such input: {', '.join(missing)}")
    if args.out is None and args.train_vocab is None:
        parser.error("give --out PREFIX (tokenize) or --train-vocab N (train a tokenizer), or both")
    if args.train_vocab is not None and args.train_vocab < 258:
        parser.error(f"--train-vocab {args.train_vocab} must be at least 258 (256 bytes, the end-of-document token, "
                     "and one merge)")
    if args.workers < 1:
        parser.error(f"--workers {args.workers} must be at least 1")
    try:
        if args.train_vocab is not None:
            if args.tokenizer in ("bytes", "sample"):
                parser.error("with --train-vocab, --tokenizer names the file to write (e.g. my_bpe.json)")
            train_tokenizer(args.inputs, args.train_vocab, args.tokenizer, args.field, args.skip_bad)
        if args.out is not None:
            done = tokenize(args.inputs, args.tokenizer, args.out, args.field, args.workers, args.skip_bad)
    except (BadRecord, TokenizerError) as e:
        print(f"launch.tokenize: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if args.out is not None:
        skipped = (f"; skipped {done['skipped']:,} bad record(s), the first: {done['first_skipped']}"
                   if done["skipped"] else "")
        print(f"wrote {done['tokens']:,} tokens in {done['documents']:,} documents ({done['dtype']}, vocabulary "
              f"{done['vocab_size']:,}, end of document {done['eod_id']}) to {args.out}.bin/.idx{skipped}")


if __name__ == "__main__":
    main()
