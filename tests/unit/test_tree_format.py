"""tree.py: nested state dicts round-trip through tensors + tagged JSON; loading builds only
allowed classes, refuses pickles, and detects a corrupted tensor by its checksum."""
import json
import zlib
from collections import OrderedDict

import pytest
import torch

from runtime.checkpoint.format import CheckpointError
from runtime.checkpoint.tree import MAGIC, flatten, read_tree, unflatten, write_index


def _write(path, state):
    tree, tensors = flatten(state)
    entries, offset = [], 0
    with open(path, "wb") as f:
        for t in tensors:
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            f.write(raw)
            entries.append({"shape": list(t.shape), "dtype": str(t.dtype)[6:], "offset": offset,
                            "nbytes": len(raw), "crc32": zlib.crc32(raw)})
            offset += len(raw)
        write_index(tree, f, entries)


def test_a_nested_state_round_trips(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    scaler = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=100, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, dtype=torch.bfloat16)
    state = OrderedDict(module=OrderedDict(w=torch.randn(3, 4), b=torch.arange(5)[1:4], e=torch.empty(0, 2)),
                        step=7, lr=1e-3, nan=float("nan"), name="x", none=None, flag=True,
                        shapes=[torch.Size([3, 4])], pair=(1, "a"), names={"b", "a"}, by_int={0: [1.5], 2: {}},
                        scaler=scaler, stage=ZeroStageEnum.gradients, dtype=torch.float16)
    _write(tmp_path / "f.pt", state)
    back = read_tree(tmp_path / "f.pt")
    assert list(back) == list(state) and type(back) is OrderedDict
    for k in ("w", "b", "e"):
        assert torch.equal(back["module"][k], state["module"][k]) and back["module"][k].dtype == state["module"][k].dtype
    assert back["step"] == 7 and type(back["step"]) is int and back["lr"] == 1e-3 and back["nan"] != back["nan"]
    assert (back["name"], back["none"], back["flag"]) == ("x", None, True)
    assert back["shapes"] == [torch.Size([3, 4])] and type(back["shapes"][0]) is torch.Size
    assert back["pair"] == (1, "a") and back["names"] == {"a", "b"} and back["by_int"] == {0: [1.5], 2: {}}
    assert type(back["scaler"]) is DynamicLossScaler and vars(back["scaler"]) == vars(scaler)
    assert back["stage"] is ZeroStageEnum.gradients and back["dtype"] is torch.float16


def test_saving_an_unknown_object_names_its_path():
    with pytest.raises(TypeError, match=r"\['optim'\]\['hook'\].*a builtins.builtin_function_or_method"):
        flatten({"optim": {"hook": print}})


def test_loading_builds_only_allowed_classes_and_never_unpickles(tmp_path):
    tree = {"$": "obj", "cls": "subprocess.Popen", "state": {"$": "dict", "items": []}}
    with pytest.raises(CheckpointError, match="subprocess.Popen.*not allowed"):
        unflatten(tree, [])
    torch.save({"w": torch.ones(2)}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="not a quintet-tree-1 file.*does not unpickle"):
        read_tree(tmp_path / "pickle.pt")


def test_a_corrupted_tensor_is_detected(tmp_path):
    _write(tmp_path / "f.pt", {"w": torch.zeros(64)})
    data = bytearray((tmp_path / "f.pt").read_bytes())
    assert data.endswith(MAGIC)
    data[10] ^= 0xFF
    (tmp_path / "f.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor 0 at byte 0 is corrupt"):
        read_tree(tmp_path / "f.pt")
    index_len = int.from_bytes(data[-16:-8], "little")
    assert json.loads(bytes(data[-16 - index_len:-16]))["format"] == "quintet-tree-1"
