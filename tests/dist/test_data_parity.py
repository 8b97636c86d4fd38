"""The real data path keeps the numerics contract: with packed documents masked from each other, a
blend of two indexed datasets and a held-out validation split, every layout's training loss and
validation loss equal one process's (fp64 1e-9, fp32 1e-5 for two-rank layouts); a resume in the
middle of the blend continues bit-exact; and data written by megatron-core trains."""
import numpy as np
import pytest

from runtime.data.indexed import IndexedWriter
from tests.training import RTOL, References, assert_same_losses, parity_cases, train

MB2, L4 = ["train.micro_batch_size=2"], ["model.n_layers=4"]
INTERLEAVED = ["parallel.vpp=2", "parallel.schedule=interleaved_1f1b"]
LAYOUTS = {
    "dp2": (2, []),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2-vpp2": (2, [*L4, *MB2, "parallel.pp=2", *INTERLEAVED]),
    "cp2-ring": (2, ["parallel.cp=2"]),
    "cp2-ulysses": (2, ["parallel.cp=2", "parallel.cp_impl=ulysses"]),
    "tp2-pp2-dp2": (8, [*MB2, "parallel.pp=2", "parallel.tp=2"]),
}


def write_documents(prefix, n_docs: int, seed: int, builder=None) -> str:
    """Documents of 3–40 random ids in [1, 1024) each ending with the sample tokenizer's end of
    document (0): sequences of 32 tokens hold several, so masks cross chunk and rank boundaries."""
    g = np.random.default_rng(seed)
    docs = [np.append(g.integers(1, 1024, g.integers(3, 41)), 0) for _ in range(n_docs)]
    if builder is None:
        with IndexedWriter(prefix, np.uint16) as w:
            for d in docs:
                w.add_document(d)
    else:
        import torch

        for d in docs:
            builder.add_item(torch.from_numpy(d))
            builder.end_document()
        builder.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    a, b = write_documents(root / "web", 400, 1), write_documents(root / "code", 300, 2)
    return ["data=indexed", "model.vocab_size=1024", f"data.blend=[[0.7,'{a}'],[0.3,'{b}']]", "data.document_mask=true",
            "data.mask_eod_loss=true", "data.valid_fraction=0.2", "eval.every=5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    return References(tmp_path_factory, data)


def _val(records):
    return [{"step": r["step"], "loss": r["val_loss"]} for r in records if "val_loss" in r]


@pytest.mark.parametrize("layout, dtype", parity_cases(LAYOUTS, fp32_default={"dp2", "cp2-ring"}))
def test_documents_blends_and_validation_match_one_process(layout, dtype, data, reference, tmp_path):
    world, overrides = LAYOUTS[layout]
    same = [o for o in overrides if o.startswith(("train.", "model."))]
    ref = reference(dtype, same)
    got = train(tmp_path, [f"train.dtype={dtype}", *data, *overrides], world_size=world)
    assert_same_losses(ref, got, RTOL[dtype])
    assert [v["step"] for v in _val(got)] == [5, 10, 15, 20]
    assert_same_losses(_val(ref), _val(got), RTOL[dtype])
    assert got[-1]["loss"] < got[0]["loss"] and _val(got)[-1]["loss"] < _val(got)[0]["loss"]


def test_document_masks_change_the_numbers(data, reference, tmp_path):
    """A control: the same run without masks differs, so the parity above checks the masks."""
    unmasked = train(tmp_path, ["train.dtype=float64", *[o for o in data if "document_mask" not in o]])
    assert abs(unmasked[-1]["loss"] - reference("float64")[-1]["loss"]) > 1e-4


def test_a_resume_in_the_middle_of_the_blend_is_bit_exact(data, reference, tmp_path):
    straight = reference("float32")
    run = [f"train.dtype=float32", *data, "checkpoint.every=0"]
    first = train(tmp_path, [*run, "train.stop_at_step=7"])
    assert [r["step"] for r in first] == list(range(1, 8))
    resumed = train(tmp_path, run)
    assert [(r["loss"], r.get("val_loss")) for r in resumed] == [(r["loss"], r.get("val_loss")) for r in straight]


def test_megatron_core_written_documents_train(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = write_documents(tmp_path / "mg", 200, 3, IndexedDatasetBuilder(str(tmp_path / "mg.bin"), dtype=np.uint16))
    got = train(tmp_path / "run", ["data=indexed", "model.vocab_size=1024", f"data.path='{prefix}'",
                                   "data.document_mask=true"])
    assert len(got) == 20 and got[-1]["loss"] < got[0]["loss"]
