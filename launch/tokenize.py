"""Write a token file for `data=tokens` from text files (byte-level: one id per byte, vocab 256).

    python -m launch.tokenize corpus.npy a.txt b.txt
    python -m launch.train data=tokens data.path=corpus.npy
"""
from __future__ import annotations

import argparse
from pathlib import Path

from runtime.data import write_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output .npy file (a .npy.json sidecar is written beside it)")
    parser.add_argument("files", nargs="+", type=Path, help="UTF-8 or binary text files, one document each")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    ids = write_tokens(args.out, [f.read_bytes() for f in args.files])
    print(f"wrote {ids.size:,} tokens from {len(args.files)} file(s) to {args.out}")


if __name__ == "__main__":
    main()
