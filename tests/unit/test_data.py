"""The loader: deterministic, resumable, and every layout sees the same global batch."""
import numpy as np
import pytest
import torch

from launch.tokenize import main as tokenize_main
from runtime.data import BatchLoader, load_tokens
from runtime.data.sources import SAMPLE_PATH, SyntheticTokens, check_source


def corpus(n=1000):
    return np.arange(n, dtype=np.int64) % 97


def global_batch(tokens, step, dp, micro, gbs=8, seq=16):
    rows = []
    for rank in range(dp):
        loader = BatchLoader(tokens, seq, gbs, micro, rank, dp, seed=5)
        rows += [b.tokens for b in loader.step(step)]
    return torch.cat(rows)


def test_every_layout_sees_the_same_sequences_in_the_same_order():
    tokens = corpus()
    ref = global_batch(tokens, 3, dp=1, micro=8)
    for dp, micro in [(2, 4), (4, 2), (2, 1), (8, 1)]:
        assert torch.equal(global_batch(tokens, 3, dp, micro), ref)


def test_labels_are_the_inputs_shifted_by_one():
    batch = BatchLoader(corpus(), 16, 8, 4, seed=1).step(0)[0]
    assert torch.equal(batch.tokens[:, 1:], batch.labels[:, :-1])
    assert batch.tokens.shape == batch.labels.shape == (4, 16) and batch.tokens.dtype == torch.int64


def test_a_step_is_a_pure_function_of_seed_and_step():
    a, b = BatchLoader(corpus(), 16, 8, 4, seed=1), BatchLoader(corpus(), 16, 8, 4, seed=1)
    for _ in range(20):  # walk a through several epochs (61 windows, 8 per step)
        a.step(_)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a.step(7), b.step(7)))
    other = BatchLoader(corpus(), 16, 8, 4, seed=2)
    assert not torch.equal(other.step(7)[0].tokens, b.step(7)[0].tokens)


def test_an_epoch_visits_every_window_once_then_reshuffles():
    tokens = np.arange(16 * 8 + 1)  # 8 windows, 2 steps of 4 per epoch
    loader = BatchLoader(tokens, 16, 4, 4, seed=0)
    starts = lambda s: sorted(int(t) for t in loader.step(s)[0].tokens[:, 0])  # noqa: E731
    assert sorted(starts(0) + starts(1)) == list(range(0, 128, 16))
    assert sorted(starts(2) + starts(3)) == list(range(0, 128, 16))
    order = lambda s: [int(t) for t in loader.step(s)[0].tokens[:, 0]]  # noqa: E731
    assert order(0) + order(1) != order(2) + order(3)


def test_the_loader_rejects_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="global batch 10 does not split into microbatches of 4 over 2"):
        BatchLoader(corpus(), 16, 10, 4, 0, 2)


def test_sample_corpus_is_bytes():
    tokens = load_tokens("sample", None, 256, 0)
    assert tokens.dtype == np.uint8 and len(tokens) > 400_000
    assert bytes(tokens[:30]).decode() == SAMPLE_PATH.read_bytes()[:30].decode()


def test_tokenize_tool_writes_a_file_the_tokens_source_reads(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    out = tmp_path / "corpus.npy"
    tokenize_main([str(out), str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert "wrote 11 tokens" in capsys.readouterr().out
    tokens = load_tokens("tokens", str(out), 256, 0)
    assert bytes(np.asarray(tokens)) == b"hello\nworld"
    assert check_source("tokens", str(out), 256, 8) == []
    assert "holds token id 119 but ids must be in [0, model.vocab_size=100)" in check_source("tokens", str(out), 100, 8)[0]
    assert "the corpus has 11 tokens, fewer than train.seq_len+1=17" in check_source("tokens", str(out), 256, 16)[0]


def test_a_token_file_must_be_a_1d_integer_array(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 3), dtype=np.float32))
    (problem,) = check_source("tokens", str(tmp_path / "x.npy"), 256, 2)
    assert "holds a 2-D float32 array; expected a 1-D array of integer token ids" in problem
    (tmp_path / "junk.npy").write_text("not numpy")
    (problem,) = check_source("tokens", str(tmp_path / "junk.npy"), 256, 2)
    assert "is not a readable .npy file" in problem


def test_synthetic_tokens_are_deterministic_and_learnable():
    s = SyntheticTokens(vocab_size=64, seed=3)
    window = s[slice(100, 140)]
    assert np.array_equal(window, SyntheticTokens(64, 3)[slice(100, 140)])
    steps = np.diff(window) % 64
    assert len(set(steps.tolist())) == 1  # one stride within a sequence: predictable
    assert window.min() >= 0 and window.max() < 64
