"""The block checkpoint format: any tiling reads back into any other; corruption is detected."""
import pytest
import torch

from runtime.checkpoint.format import StateBlock
from runtime.checkpoint.format import CheckpointError, load_blocks, read_index, write_shard

FULL = torch.arange(48, dtype=torch.float64).reshape(6, 8)


def blocks_of(full, rows: int, cols: int):
    """Tile `full` into rows × cols rectangles, as (rank, StateBlock)."""
    out = []
    for i, r in enumerate(torch.arange(full.shape[0]).chunk(rows)):
        for j, c in enumerate(torch.arange(full.shape[1]).chunk(cols)):
            block = (slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1))
            out.append(StateBlock("model/w", full[block].clone(), tuple(full.shape), block))
    return out


def save(tmp_path, rows, cols):
    for rank, block in enumerate(blocks_of(FULL, rows, cols)):
        write_shard(tmp_path, rank, [block, StateBlock("optim/w/step", torch.tensor(7.0), (), ())])


@pytest.mark.parametrize("saved, loaded", [((2, 1), (1, 1)), ((3, 2), (2, 4)), ((1, 1), (6, 8)), ((2, 4), (3, 1))])
def test_any_tiling_reads_back_into_any_other(tmp_path, saved, loaded):
    save(tmp_path, *saved)
    targets = blocks_of(torch.zeros_like(FULL), *loaded)
    load_blocks(tmp_path, targets)
    for t in targets:
        assert torch.equal(t.local, FULL[t.block])
    step = StateBlock("optim/w/step", torch.tensor(0.0), (), ())
    load_blocks(tmp_path, [step])
    assert step.local.item() == 7.0


def test_a_corrupted_byte_is_detected(tmp_path):
    save(tmp_path, 2, 1)
    path = tmp_path / "shard-00001.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    target = blocks_of(torch.zeros_like(FULL), 1, 1)
    with pytest.raises(CheckpointError, match="shard-00001.bin: block of model/w at byte 0 is corrupt"):
        load_blocks(tmp_path, target)


def test_missing_pieces_and_wrong_shapes_are_named(tmp_path):
    save(tmp_path, 2, 1)
    (tmp_path / "shard-00001.json").unlink()
    with pytest.raises(CheckpointError, match="cover 24 of the 48 elements"):
        load_blocks(tmp_path, blocks_of(torch.zeros_like(FULL), 1, 1))
    other = StateBlock("model/w", torch.zeros(6, 9), (6, 9), (slice(0, 6), slice(0, 9)))
    with pytest.raises(CheckpointError, match=r"model/w has shape \(6, 8\) in .* but \(6, 9\) in this model"):
        load_blocks(tmp_path, [other])
    with pytest.raises(CheckpointError, match="has no model/v"):
        load_blocks(tmp_path, [StateBlock("model/v", torch.zeros(1), (1,), (slice(0, 1),))])


def test_the_index_is_plain_json_and_bfloat16_round_trips(tmp_path):
    t = torch.randn(4, 3).to(torch.bfloat16)
    write_shard(tmp_path, 0, [StateBlock("model/b", t, (4, 3), (slice(0, 4), slice(0, 3)))])
    (entry,) = read_index(tmp_path)["model/b"]
    assert entry["dtype"] == "bfloat16" and entry["nbytes"] == 24
    back = StateBlock("model/b", torch.zeros(4, 3, dtype=torch.bfloat16), (4, 3), (slice(0, 4), slice(0, 3)))
    load_blocks(tmp_path, [back])
    assert torch.equal(back.local, t)
