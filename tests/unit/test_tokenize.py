"""Tokenizers of every kind, launch.tokenize on every input kind (its output read back by
megatron-core), and every bad input stopping with its file and line and leaving nothing behind."""
import base64
import gzip
import json

import numpy as np
import pytest

from launch.tokenize import main as tokenize_main
from launch.tokenize import tokenize
from runtime.data.indexed import IndexedFormatError, IndexedTokens
from runtime.data.tokenizer import TokenizerError, load_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2\n", "héllo wörld ✓",
         "the theme of the thesis"]


def _megatron_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds.document_indices.tolist()


def _expected(spec, texts):
    tok = load_tokenizer(spec)
    return [ids + [tok.eod_id] for ids in tok.encode_batch(texts)]


def _spm_model(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_prefix=str(tmp_path / "spm"),
                                   vocab_size=60, model_type="bpe", eos_id=2, minloglevel=2)
    return tmp_path / "spm.model"


def _tiktoken_file(tmp_path):
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"he", b"the", b" the"]
    path = tmp_path / "tok.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    return path


def test_tokenizers_of_every_kind_encode_decode_and_name_their_end_of_document(tmp_path):
    b = load_tokenizer("bytes")
    assert (b.vocab_size, b.eod_id) == (257, 256) and b.encode_batch(["é"]) == [[195, 169]]
    sample = load_tokenizer("sample")
    assert (sample.vocab_size, sample.eod_id) == (1024, 0)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(load_tokenizer("sample").tok.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    assert load_tokenizer(str(folder)).eod_id == 0
    spm_tok = load_tokenizer(str(_spm_model(tmp_path)))
    assert spm_tok.eod_id == 2 and spm_tok.vocab_size == 60
    tik = load_tokenizer(str(_tiktoken_file(tmp_path)))
    assert (tik.vocab_size, tik.eod_id) == (261, 260)
    assert tik.encode_batch(["the"]) == [[258]]
    for tok in (b, sample, spm_tok, tik):
        ids = tok.encode_batch(TEXTS)
        assert all(max(i) < tok.vocab_size for i in ids)
        if tok is not spm_tok:  # SentencePiece normalises whitespace
            assert [tok.decode(i) for i in ids] == TEXTS


def test_a_tokenizer_that_cannot_be_loaded_is_named(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="data.tokenizer=.*bad.json is not a readable tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    (tmp_path / "bad.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(TokenizerError, match="is not a readable SentencePiece model or tiktoken-format BPE file"):
        load_tokenizer(str(tmp_path / "bad.model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="is a folder without tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))


def _inputs(tmp_path):
    """The same documents in every kind of input, in order: (paths, texts)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts, paths = [], []
    (tmp_path / "a.txt").write_text(TEXTS[0])
    paths.append(tmp_path / "a.txt")
    texts.append(TEXTS[0])
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS))
    (tmp_path / "b.jsonl").write_text(lines)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": TEXTS, "n": list(range(len(TEXTS)))}), tmp_path / "e.parquet")
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "f"))
    for name in ("b.jsonl", "c.jsonl.gz", "d.jsonl.zst", "e.parquet", "f"):
        paths.append(tmp_path / name)
        texts += TEXTS
    return [str(p) for p in paths], texts


@pytest.mark.parametrize("spec", ["sample", "bytes"])
def test_every_input_kind_becomes_documents_that_megatron_reads_back(tmp_path, spec, capsys):
    paths, texts = _inputs(tmp_path)
    tokenize_main(["--tokenizer", spec, "--out", str(tmp_path / "out"), "--workers", "2", *paths])
    assert f"in {len(texts)} documents" in capsys.readouterr().out
    docs, document_index = _megatron_documents(tmp_path / "out")
    assert docs == _expected(spec, texts)  # the tokenizer's own ids, then the end of document
    assert document_index == list(range(len(texts) + 1))
    ours = IndexedTokens(tmp_path / "out")
    assert ours.dtype == np.uint16 and [ours.document(i).tolist() for i in range(ours.num_documents)] == docs
    # The output does not depend on the number of workers.
    tokenize(paths, spec, str(tmp_path / "one"), workers=1, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"out{ext}").read_bytes()
    meta = json.loads((tmp_path / "out.bin.json").read_text())
    assert meta["max_id"] == max(max(d) for d in docs) and meta["tokens"] == sum(map(len, docs))


def test_a_vocabulary_above_65536_ids_is_stored_as_int32(tmp_path):
    path = tmp_path / "big.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)) +
                    "".join(f"{base64.b64encode(b'x' + str(i).encode()).decode()} {256 + i}\n" for i in range(65_400)))
    (tmp_path / "a.txt").write_text("abc")
    tokenize([str(tmp_path / "a.txt")], str(path), str(tmp_path / "out"), progress=False)
    assert IndexedTokens(tmp_path / "out").dtype == np.int32


def test_train_a_bpe_tokenizer_then_tokenize_with_it(tmp_path, capsys):
    paths, texts = _inputs(tmp_path)
    tok_path = tmp_path / "bpe.json"
    tokenize_main(["--train-vocab", "300", "--tokenizer", str(tok_path), "--out", str(tmp_path / "out"), *paths])
    assert "trained a byte-level BPE tokenizer of 300 ids (end of document: 0)" in capsys.readouterr().out
    assert _megatron_documents(tmp_path / "out")[0] == _expected(str(tok_path), texts)


BAD = [
    ("a.txt", b"ok \xff\xfe bad", "a.txt: not UTF-8 text (byte 3"),
    ("b.jsonl", b'{"text": "fine"}\n{"text": oops}\n', "b.jsonl, line 2: not JSON"),
    ("c.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', "c.jsonl, line 2: no field 'text' (it has ['body']); choose one "
                                                         "with --field"),
    ("d.jsonl", b'{"text": "fine"}\n{"text": ""}\n', "d.jsonl, line 2: an empty document"),
    ("e.jsonl", b'{"text": 7}\n', "e.jsonl, line 1: the field 'text' holds int, not text"),
    ("f.jsonl.gz", gzip.compress(b'{"text": "fine"}\n' * 100)[:-20], "f.jsonl.gz: cannot be decompressed"),
]


@pytest.mark.parametrize("name, content, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_record_stops_with_its_file_and_line_and_leaves_no_output(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        tokenize_main(["--out", str(tmp_path / "out"), "--workers", "2", str(tmp_path / name)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written, not even temporary files


def test_a_parquet_file_without_the_column(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(SystemExit):
        tokenize_main(["--out", str(tmp_path / "out"), str(tmp_path / "p.parquet")])
    assert "p.parquet: no column 'text' (its columns: ['body']); choose one with --field" in capsys.readouterr().err


def test_the_line_number_of_a_bad_line_deep_in_a_large_file_and_skip_bad(tmp_path, capsys):
    good = json.dumps({"text": "a line of text that is long enough " * 3}) + "\n"
    lines = [good] * 40_000
    lines[31_337] = "{broken\n"  # the file spans several blocks of a megabyte
    (tmp_path / "big.jsonl").write_text("".join(lines))
    with pytest.raises(SystemExit):
        tokenize_main(["--out", str(tmp_path / "out"), "--workers", "2", str(tmp_path / "big.jsonl")])
    assert "big.jsonl, line 31338: not JSON" in capsys.readouterr().err
    tokenize_main(["--out", str(tmp_path / "out"), "--workers", "2", "--skip-bad", str(tmp_path / "big.jsonl")])
    out = capsys.readouterr().out
    assert "in 39,999 documents" in out and "skipped 1 bad record(s), the first: " in out and "line 31338" in out


def test_an_index_that_does_not_match_its_data_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("some text to tokenize")
    tokenize([str(tmp_path / "a.txt")], "sample", str(tmp_path / "d"), progress=False)
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-2])
    with pytest.raises(IndexedFormatError, match=r"d.bin is \d+ bytes but .*d.idx describes \d+ .*truncated, or the "
                                                 "two files do not belong together"):
        IndexedTokens(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes((tmp_path / "d.idx").read_bytes()[:-8])
    with pytest.raises(IndexedFormatError, match="d.idx is .* bytes but its header .* needs"):
        IndexedTokens(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(b"junk" * 10)
    with pytest.raises(IndexedFormatError, match="is not a Megatron index file"):
        IndexedTokens(tmp_path / "d")
    (tmp_path / "d.idx").unlink()
    with pytest.raises(IndexedFormatError, match="d.idx does not exist"):
        IndexedTokens(tmp_path / "d")
