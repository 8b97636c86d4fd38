"""The data path: sources, the keyed window order, blends, held-out splits, document masks, and
a loader that is deterministic, resumable and gives every layout the same global batch."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from runtime.data import BatchLoader, build_datasets, load_tokenizer
from runtime.data.dataset import dataset_problems
from runtime.data.indexed import IndexedWriter
from runtime.data.loader import document_ids
from runtime.data.sequences import Blend, Windows, blend_assign, permute
from runtime.data.sources import (SAMPLE_PATH, Corpus, DataError, SyntheticTokens, open_corpus, sample_corpus,
                                  sample_documents, split_corpus)
from runtime.loss import IGNORE_INDEX


def corpus(n=1000):
    return np.arange(n, dtype=np.int64) % 97


def loader(tokens, seq=16, gbs=8, micro=4, rank=0, dp=1, seed=5, **kw):
    return BatchLoader(Blend([Windows(tokens, seq, seed)], [1.0]), gbs, micro, rank, dp, **kw)


def data_cfg(**kw):
    base = dict(name="tokens", path=None, blend=None, dtype=None, valid_fraction=0.0, valid_path=None,
                valid_blend=None, document_mask=False, mask_eod_loss=False, tokenizer="sample")
    return SimpleNamespace(**{**base, **kw})


def global_batch(tokens, step, dp, micro):
    return torch.cat([b.tokens for rank in range(dp) for b in loader(tokens, micro=micro, rank=rank, dp=dp).step(step)])


def test_every_layout_sees_the_same_sequences_in_the_same_order():
    ref = global_batch(corpus(), 3, dp=1, micro=8)
    for dp, micro in [(2, 4), (4, 2), (2, 1), (8, 1)]:
        assert torch.equal(global_batch(corpus(), 3, dp, micro), ref)


def test_labels_are_the_inputs_shifted_by_one():
    batch = loader(corpus()).step(0)[0]
    assert torch.equal(batch.tokens[:, 1:], batch.labels[:, :-1])
    assert batch.tokens.shape == batch.labels.shape == (4, 16) and batch.tokens.dtype == torch.int64


def test_a_step_is_a_pure_function_of_seed_and_step():
    a, b = loader(corpus(), seed=1), loader(corpus(), seed=1)
    for s in range(20):  # walk a through several epochs (61 windows, 8 per step)
        a.step(s)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a.step(7), b.step(7)))
    assert not torch.equal(loader(corpus(), seed=2).step(7)[0].tokens, b.step(7)[0].tokens)


def test_an_epoch_visits_every_window_once_then_reshuffles():
    tokens = np.arange(16 * 8 + 1)  # 8 windows, 2 steps of 4 per epoch
    run = loader(tokens, gbs=4, micro=4, seed=0)
    order = lambda s: [int(t) for t in run.step(s)[0].tokens[:, 0]]  # noqa: E731
    assert sorted(order(0) + order(1)) == sorted(order(2) + order(3)) == list(range(0, 128, 16))
    assert order(0) + order(1) != order(2) + order(3)


def test_the_keyed_order_is_a_bijection_for_any_size():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        assert sorted(permute(np.arange(n), n, np.uint64(n * 31)).tolist()) == list(range(n))


def test_a_blend_draws_each_share_and_reads_each_member_in_order():
    weights = [0.5, 0.3, 0.2]
    member, index = blend_assign(np.arange(10_000), weights)
    for m, w in enumerate(weights):
        mine = member == m
        assert abs(mine.sum() - w * 10_000) <= 1
        assert np.array_equal(index[mine], np.arange(mine.sum()))  # its sequences 0, 1, 2, ... in turn
    for n in (7, 100, 1001):  # any prefix of the run holds each share to within one sequence
        assert all(abs((member[:n] == m).sum() - w * n) <= 1 for m, w in enumerate(weights))
    tail_member, tail_index = blend_assign(np.arange(6000, 6010), weights)  # resuming mid-run: nothing but i
    assert np.array_equal(tail_member, member[6000:6010]) and np.array_equal(tail_index, index[6000:6010])


def test_a_blend_of_two_corpora_mixes_their_sequences_by_weight():
    a, b = np.zeros(16 * 40 + 1, np.int64), np.ones(16 * 40 + 1, np.int64)
    blend = Blend([Windows(a, 16, 0, 0), Windows(b, 16, 0, 1)], [3, 1])
    rows = blend.rows(np.arange(400))
    assert (rows[:, 0] == 0).sum() == 300 and (rows[:, 0] == 1).sum() == 100


def test_the_loader_rejects_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="global batch 10 does not split into microbatches of 4 over 2"):
        loader(corpus(), gbs=10, micro=4, dp=2)


def test_the_sample_corpus_is_its_documents_in_the_shipped_tokenizer_each_ending_with_eod():
    tok = load_tokenizer("sample")
    c = sample_corpus(tok)
    docs = sample_documents()
    assert len(docs) == len(c.doc_starts) - 1 > 50
    assert "".join(docs).replace("\n", "") == SAMPLE_PATH.read_text().replace("\n", "")
    for i in (0, 7, len(docs) - 1):
        ids = c.tokens[c.doc_starts[i]:c.doc_starts[i + 1]]
        assert ids[-1] == tok.eod_id and tok.decode(ids[:-1]) == docs[i]


def test_synthetic_tokens_are_deterministic_and_learnable():
    s = SyntheticTokens(vocab_size=64, seed=3)
    window = s[slice(100, 140)]
    assert np.array_equal(window, SyntheticTokens(64, 3)[slice(100, 140)])
    assert len(set((np.diff(window) % 64).tolist())) == 1  # one stride within a sequence: predictable
    assert window.min() >= 0 and window.max() < 64


def test_document_ids_and_the_eod_loss_mask():
    tokens = torch.tensor([[5, 0, 6, 7, 0, 0, 8]])
    assert document_ids(tokens, eod_id=0).tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    seq = np.array([5, 0, 6, 7, 0, 0, 8, 9, 0, 1, 2] * 10, np.int64)
    run = loader(seq, seq=8, gbs=2, micro=2, eod_id=0, document_mask=True, mask_eod_loss=True)
    batch, rows = run.step(0)[0], torch.from_numpy(run.sequences.rows(np.arange(2)))
    assert torch.equal(batch.documents, document_ids(batch.tokens, 0))
    assert torch.equal(batch.labels == IGNORE_INDEX, rows[:, 1:] == 0)  # every end-of-document target, only those
    assert torch.equal(batch.labels[rows[:, 1:] != 0], rows[:, 1:][rows[:, 1:] != 0])


def test_a_raw_token_file_needs_its_dtype_and_then_reads_like_nanogpt(tmp_path):
    ids = np.arange(100, dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match="give its dtype, e.g. data.dtype=uint16"):
        open_corpus(str(tmp_path / "train.bin"))
    assert np.array_equal(np.asarray(open_corpus(str(tmp_path / "train.bin"), "uint16").tokens), ids)
    with pytest.raises(DataError, match="not a whole number of int32 ids"):
        (tmp_path / "odd.bin").write_bytes(b"\0" * 6)
        open_corpus(str(tmp_path / "odd.bin"), "int32")


def test_a_npy_token_file_must_be_a_1d_integer_array(tmp_path):
    np.save(tmp_path / "ok.npy", np.arange(50, dtype=np.int32))
    assert len(open_corpus(str(tmp_path / "ok.npy"))) == 50
    with pytest.raises(DataError, match="records its own dtype; data.dtype=uint16 is for headerless token files"):
        open_corpus(str(tmp_path / "ok.npy"), "uint16")
    np.save(tmp_path / "x.npy", np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(DataError, match="holds a 2-D float32 array; expected a 1-D array of integer token ids"):
        open_corpus(str(tmp_path / "x.npy"))
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(DataError, match="is not a readable .npy file"):
        open_corpus(str(tmp_path / "junk.npy"))


def _indexed(prefix, docs, dtype=np.uint16):
    with IndexedWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def test_the_validation_split_falls_on_a_document_boundary(tmp_path):
    docs = [[1] * 30 + [0], [2] * 30 + [0], [3] * 30 + [0], [4] * 30 + [0]]
    c = open_corpus(_indexed(tmp_path / "d", docs))
    train, valid = split_corpus(c, 0.3, eod_id=0)  # the cut (at 86) moves to the next document, at 93
    assert len(train) == 93 and np.asarray(valid.tokens[0:31]).tolist() == docs[3]
    assert valid.doc_starts.tolist() == [0, 31]
    flat = Corpus("flat", np.concatenate([np.array(d) for d in docs]))  # no index: the next end of document
    train, valid = split_corpus(flat, 0.3, eod_id=0)
    assert len(train) == 93 and np.asarray(valid.tokens[0:2]).tolist() == [4, 4]


def test_datasets_from_config_and_their_problems(tmp_path):
    docs = [list(range(1, 40)) + [0] for _ in range(10)]
    a, b = _indexed(tmp_path / "a", docs), _indexed(tmp_path / "b", [[5] * 99 + [0]] * 10)
    tok = load_tokenizer("sample")
    sets = build_datasets(data_cfg(blend=[[0.5, a], [0.5, b]], valid_fraction=0.2), tok, 1024, 16, 0)
    assert sets.valid is not None and len(sets.train.members) == 2 and len(sets.corpora) == 4
    assert dataset_problems(data_cfg(blend=[[1, a], [1, b]]), tok, 1024, 16, 0) == []
    (problem,) = dataset_problems(data_cfg(path=a), tok, 30, 16, 0)
    assert f"{a} holds token id 39 but ids must be in [0, model.vocab_size=30)" in problem
    (problem,) = dataset_problems(data_cfg(path=str(tmp_path / "missing")), tok, 1024, 16, 0)
    assert "missing does not exist" in problem
    (problem,) = dataset_problems(data_cfg(path=a), tok, 1024, 500, 0)
    assert "has 400 tokens, fewer than train.seq_len+1=501" in problem
