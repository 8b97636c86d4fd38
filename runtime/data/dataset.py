"""What a run trains and validates on, from its `data` config: the corpora, the held-out split,
their windows and the blend (runtime/data/sequences.py). Every problem is a DataError naming the
file or key and the value."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.data.sequences import Blend, Windows
from runtime.data.sources import (Corpus, DataError, SyntheticTokens, id_range_problem, open_corpus, sample_corpus,
                                  split_corpus)

VALID_MEMBER = 1 << 20  # validation windows are keyed apart from the training windows


@dataclass
class Datasets:
    train: Blend
    valid: Blend | None
    corpora: list[Corpus]  # every corpus read (training and validation), for the checks of their ids


def blend_of(blend, path, prefix: str) -> list[tuple[float, str, str]]:
    """[(weight, path, the key that names it)] of `data.<prefix>blend` or `data.<prefix>path`
    (one member of weight 1)."""
    if blend:
        return [(float(w), str(p), f"data.{prefix}blend[{i}]") for i, (w, p) in enumerate(blend)]
    return [(1.0, str(path), f"data.{prefix}path")] if path else []


def _corpora(data, tokenizer, vocab_size: int, seed: int, members) -> list[Corpus]:
    if data.name == "synthetic":
        return [Corpus("synthetic tokens", SyntheticTokens(vocab_size, seed))]
    if data.name == "sample":
        return [sample_corpus(tokenizer)]
    return [open_corpus(p, data.dtype, key) for _, p, key in members]


def _blend(corpora: list[Corpus], weights: list[float], seq_len: int, seed: int, salt: int, what: str) -> Blend:
    for c in corpora:
        if len(c) < seq_len + 1:
            raise DataError(f"{what} {c.name} has {len(c)} tokens, fewer than train.seq_len+1={seq_len + 1}")
    return Blend([Windows(c.tokens, seq_len, seed, salt + k) for k, c in enumerate(corpora)], weights)


def build_datasets(data, tokenizer, vocab_size: int, seq_len: int, seed: int) -> Datasets:
    """The training blend and, when the config asks for one, the validation blend."""
    members = blend_of(data.blend, data.path, "")
    weights = [w for w, _, _ in members] or [1.0]
    corpora = _corpora(data, tokenizer, vocab_size, seed, members)
    valid_members = blend_of(data.valid_blend, data.valid_path, "valid_")
    valid, valid_corpora = None, []
    if valid_members:
        valid_corpora = [open_corpus(p, data.dtype, key) for _, p, key in valid_members]
        valid = _blend(valid_corpora, [w for w, _, _ in valid_members], seq_len, seed, VALID_MEMBER, "validation data")
    elif data.valid_fraction > 0:
        parts = [split_corpus(c, data.valid_fraction, tokenizer.eod_id) for c in corpora]
        corpora, valid_corpora = [t for t, _ in parts], [v for _, v in parts]
        valid = _blend(valid_corpora, weights, seq_len, seed, VALID_MEMBER,
                       f"the validation part (data.valid_fraction={data.valid_fraction}) of")
    what = f"the training part (data.valid_fraction={data.valid_fraction}) of" if data.valid_fraction else "data"
    train = _blend(corpora, weights, seq_len, seed, 0, what)
    return Datasets(train, valid, corpora + valid_corpora)


def dataset_problems(data, tokenizer, vocab_size: int, seq_len: int, seed: int) -> list[str]:
    """What is wrong with the files a run would read, as messages (empty when fine): each opens,
    its index matches its data, each part is long enough, and every id is below vocab_size
    (from a sidecar that vouches for the file, else by a scan), so that no step fails at the
    first bad id."""
    try:
        datasets = build_datasets(data, tokenizer, vocab_size, seq_len, seed)
    except DataError as e:
        return [str(e)]
    if data.name == "synthetic":  # generated below vocab_size
        return []
    return [p for p in (id_range_problem(c, vocab_size) for c in datasets.corpora) if p]
