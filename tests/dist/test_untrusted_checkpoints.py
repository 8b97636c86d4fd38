"""A checkpoint folder someone sends you runs none of their code: every file of every kind a
checkpoint folder holds is replaced by a pickle (or a torch file) whose unpickling would run a
command, and resuming, exporting, DeepSpeed's load through quintet's engine and the DeepSpeed
converter each refuse it with a message naming the file — and the command never runs."""
import io
import json
import os
import pickle
import shutil

import pytest
import torch

from launch.spawn import run_ranks
from tests.training import train


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickled(marker) -> bytes:
    return pickle.dumps(Payload(marker))


def _torch_file(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(2), "payload": Payload(marker)}, buffer)
    return buffer.getvalue()


def _dcp_metadata_with(path, marker, mutate) -> bytes:
    """The engine's own DCP metadata (read here with plain pickle: the test wrote it), altered."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    mutate(metadata, marker)
    return pickle.dumps(metadata)


def _bytes_entry(metadata, marker):
    """A legal DCP entry of pickled bytes: DCP's planner would torch.load it without weights_only."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    name = next(iter(metadata.state_dict_metadata))
    metadata.state_dict_metadata[name] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(name)] = _StorageInfo("__0_0.distcp", 0, 10)


def _escaping_path(metadata, marker):
    for info in metadata.storage_data.values():
        info.relative_path = "../../../../../etc/hostname"


STEP = "checkpoints/step_00000004"
CASES = {
    # name: (engine, file in the run directory, its hostile content given (step dir, marker))
    "quintet index": ("sync", f"{STEP}/shard-00000.json", lambda d, m: _pickled(m)),
    "quintet data": ("sync", f"{STEP}/shard-00000.bin", lambda d, m: _torch_file(m)),
    "trainer.json": ("sync", f"{STEP}/trainer.json", lambda d, m: _pickled(m)),
    "latest marker": ("sync", "checkpoints/latest", lambda d, m: _pickled(m)),
    "planted DCP metadata": ("sync", f"{STEP}/.metadata", lambda d, m: _pickled(m)),
    "DCP metadata": ("dcp_async", f"{STEP}/.metadata", lambda d, m: _pickled(m)),
    "DCP data": ("dcp_async", f"{STEP}/__0_0.distcp", lambda d, m: _torch_file(m)),
    "DCP bytes entry": ("dcp_async", f"{STEP}/.metadata", lambda d, m: _dcp_metadata_with(d, m, _bytes_entry)),
    "DCP data outside": ("dcp_async", f"{STEP}/.metadata", lambda d, m: _dcp_metadata_with(d, m, _escaping_path)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for engine in ("sync", "dcp_async"):
        out[engine] = tmp_path_factory.mktemp(engine)
        train(out[engine], ["train.steps=4", "checkpoint.every=4", f"checkpoint.engine={engine}"])
    return out


def _resume(rank, world, run_dir):
    from launch.config import compose
    from launch.train import setup
    from runtime.checkpoint import CheckpointError
    from tests.training import SMALL

    try:
        setup(compose([*SMALL, f"run_dir={run_dir}", "checkpoint.fallback=false"]))
    except CheckpointError as e:
        return str(e)
    return "resumed"


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_file_in_a_checkpoint_runs_nothing(runs, tmp_path, case, capsys):
    from launch.export import main as export

    engine, name, content = CASES[case]
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(runs[engine], run)
    target = run / name
    target.write_bytes(content(runs[engine] / STEP, marker))
    (error,) = run_ranks(_resume, 1, args=(run,))
    with pytest.raises(SystemExit) as exit_code:
        export([str(run), str(tmp_path / "hf")])
    message = capsys.readouterr().err
    assert not marker.exists(), f"{case}: the checkpoint ran a command"
    assert error != "resumed" and exit_code.value.code == 2
    # The file, or for the folder's marker and DCP's data files, the folder.
    named = target.parent if name.endswith(("latest", ".distcp")) else target
    assert str(named) in error and str(named) in message, (error, message)


def test_deepspeed_files_are_never_unpickled(tmp_path):
    from launch.deepspeed_convert import main as convert
    from runtime.checkpoint.deepspeed_engine import load_tree_file
    from runtime.checkpoint.format import CheckpointError

    marker = tmp_path / "pwned"
    tag = tmp_path / "save/step3"
    tag.mkdir(parents=True)
    (tmp_path / "save/latest").write_text("step3")
    hostile = {
        "mp_rank_00_model_states.qtree": _torch_file(marker),  # a torch pickle under quintet's name
        "zero_pp_rank_0_mp_rank_00_optim_states.qtree": _tree_asking_for("posix.system"),
    }
    for name, data in hostile.items():
        (tag / name).write_bytes(data)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(_torch_file(marker))  # a stock torch file
    for name, why in (("mp_rank_00_model_states.pt", "is not a quintet-tree-1 file"),
                      ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "asks for class 'posix.system', which is not allowed"),
                      ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "is a torch file, not written by quintet's engine")):
        with pytest.raises(CheckpointError, match=why):
            load_tree_file(tag / name)
    with pytest.raises(SystemExit) as exit_code:
        convert(["stock", str(tmp_path / "save"), str(tmp_path / "out")])
    assert exit_code.value.code == 2
    with pytest.raises(SystemExit):
        convert(["stock", str(tmp_path / "save"), str(tmp_path / "out"), "--tag", "../../etc"])
    assert not marker.exists()


def _tree_asking_for(cls: str) -> bytes:
    """A well-formed quintet tree file whose index asks to build `cls`."""
    from runtime.checkpoint.tree import FORMAT, MAGIC

    index = json.dumps({"format": FORMAT, "tree": {"$": "obj", "cls": cls, "state": {}}, "tensors": []}).encode()
    return index + len(index).to_bytes(8, "little") + MAGIC
