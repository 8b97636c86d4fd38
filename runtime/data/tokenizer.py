"""Tokenizers: byte-level, Hugging Face `tokenizer.json`, SentencePiece and tiktoken-format BPE.

    tok = load_tokenizer("sample")                    # the BPE shipped with quintet (sample corpus)
    tok = load_tokenizer("bytes")                     # one id per byte, end of document = 256
    tok = load_tokenizer("path/to/model_dir")         # a folder holding tokenizer.json
    tok = load_tokenizer("tokenizer.model")           # SentencePiece, or tiktoken-format BPE
    ids = tok.encode_batch(["some text", ...])        # no special tokens added

Every tokenizer says its vocabulary size (ids are below it) and its end-of-document id, the id
`launch.tokenize` appends after each document and document masking splits on (None when the
tokenizer has no such token; then neither is possible). A tokenizer's "own encoding" of a text
is its ids without special tokens (no BOS): `encode_batch` returns exactly that.
"""
from __future__ import annotations

import base64
import json
import os
from functools import lru_cache
from pathlib import Path

SAMPLE_TOKENIZER = Path(__file__).with_name("sample_tokenizer.json")
# End-of-document tokens of common tokenizers, tried in order when the folder's
# tokenizer_config.json does not name one.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<EOS>")
# The pre-tokenisation of tiktoken-format files (a file holds only the merges): GPT-4's
# cl100k_base pattern, which Llama 3's tokenizer also uses.
TIKTOKEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerError(ValueError):
    pass


class ByteTokenizer:
    """One id per UTF-8 byte (0..255); the end-of-document id is 256, so the vocabulary is 257."""

    name, vocab_size, eod_id = "bytes", 257, 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.name = str(path)
        self.tok = Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._eod(path.parent)

    def _eod(self, folder: Path) -> int | None:
        config = folder / "tokenizer_config.json"
        names = list(EOD_CANDIDATES)
        try:
            eos = json.loads(config.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names.insert(0, eos)
        except (OSError, ValueError, AttributeError):
            pass
        for name in names:
            if (i := self.tok.token_to_id(name)) is not None:
                return i
        return None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.name = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.vocab_size()
        self.eod_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


class TiktokenTokenizer:
    """A tiktoken-format BPE file (lines of `base64(token) rank`, as Llama 3's tokenizer.model
    and OpenAI's .tiktoken files): the merges, GPT-4's pre-tokenisation pattern, and one special
    token after the ranks, `<|endoftext|>`, the end of document."""

    def __init__(self, path: Path):
        import tiktoken

        self.name = str(path)
        ranks = read_tiktoken_ranks(path)
        eod = max(ranks.values()) + 1
        self.enc = tiktoken.Encoding(name=path.stem, pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": eod})
        self.vocab_size, self.eod_id = eod + 1, eod

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise TokenizerError(f"{path}, line {number}: not a tiktoken-format line (base64 token, rank): "
                                     f"{line[:60]!r}") from e
    if not ranks:
        raise TokenizerError(f"{path} holds no tokens")
    return ranks


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline().split()
    try:
        return len(first) == 2 and bool(base64.b64decode(first[0], validate=True)) and first[1].isdigit()
    except ValueError:
        return False


def resolve_tokenizer_path(spec: str) -> Path | str:
    """What `data.tokenizer=spec` names: "bytes", or the file to load."""
    if spec == "bytes":
        return "bytes"
    if spec == "sample":
        return SAMPLE_TOKENIZER
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"data.tokenizer={spec} is a folder without tokenizer.json or tokenizer.model")
    if not path.is_file():
        raise TokenizerError(f"data.tokenizer={spec} does not exist (cwd {os.getcwd()}); valid: bytes, sample, a "
                             "tokenizer.json, a SentencePiece .model, a tiktoken-format BPE file, or a folder "
                             "holding tokenizer.json")
    return path


@lru_cache(maxsize=8)
def load_tokenizer(spec: str):
    """The tokenizer `data.tokenizer=spec` names (TokenizerError says why it cannot be loaded)."""
    path = resolve_tokenizer_path(spec)
    if path == "bytes":
        return ByteTokenizer()
    try:
        if path.suffix == ".json":
            return HFTokenizer(path)
        if _is_tiktoken_file(path):
            return TiktokenTokenizer(path)
        return SentencePieceTokenizer(path)
    except TokenizerError:
        raise
    except Exception as e:  # each library has its own exceptions for a file it cannot read
        kind = "tokenizer.json" if path.suffix == ".json" else "SentencePiece model or tiktoken-format BPE file"
        raise TokenizerError(f"data.tokenizer={spec} is not a readable {kind}: {str(e).splitlines()[0][:200]}") from e


def train_bpe(texts, vocab_size: int, out: str | os.PathLike, eod: str = "<|endoftext|>") -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2's scheme: every byte is a token, so any text
    encodes) on an iterator of texts, with `eod` as its one special token, and save it as a
    Hugging Face tokenizer.json at `out` (written under a temporary name, then renamed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)
    return HFTokenizer(out)


def tokenizer_vocab_size(spec: str) -> int:
    """The vocabulary size of `data.tokenizer=spec` (the `tiny` preset's model.vocab_size)."""
    return load_tokenizer(str(spec)).vocab_size
