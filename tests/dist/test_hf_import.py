"""A Hugging Face checkpoint imported into any layout (`model=hf model.hf_path=DIR`: each rank
reads only its slices) trains as the one-process import does (fp64 within 1e-9), and a model
trained under tp2 × pp2 × dp2 and exported loads in transformers with the loss quintet gives it."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from launch.load import load_checkpoint
from launch.spawn import scaled
from tests.hf_models import save_random
from tests.training import RTOL, assert_same_losses, total_losses, train

transformers = pytest.importorskip("transformers")

RUN = ["data=synthetic", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
       "train.steps=3", "optim.warmup_steps=1", "logging.every=1000", "checkpoint.pool_mb=8", "logging.peak_tflops=1"]
LAYOUTS = {
    "tp2-pp2": ("qwen3", 4, ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true"]),
    "pp2-vpp2": ("qwen3", 2, ["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b"]),
    "cp2": ("qwen3", 2, ["parallel.cp=2"]),
    "fsdp-dp4": ("qwen3", 4, ["parallel.dp_impl=fsdp", "train.micro_batch_size=2"]),
    "ep2": ("mixtral", 2, ["parallel.ep=2"]),
    "tp2-sp-ep2-etp2": ("mixtral", 4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=2"]),
    # latent attention's column-split up-projections and replicated down-projections, the
    # experts folded over TP, the routing bias read from the folder
    "deepseek-tp2-sp-ep2": ("deepseek_v3", 2, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1"]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {"qwen3": save_random("qwen3", tmp_path_factory.mktemp("qwen3"), num_hidden_layers=4),
            "mixtral": save_random("mixtral", tmp_path_factory.mktemp("mixtral")),
            "deepseek_v3": save_random("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3"))}


@pytest.fixture(scope="module")
def references(folders, tmp_path_factory):
    return {arch: train(tmp_path_factory.mktemp("ref"), ["model=hf", f"model.hf_path={folder}", "train.dtype=float64",
                                                          *RUN], small=False)
            for arch, folder in folders.items()}


@pytest.mark.parametrize("arch", ["qwen3", "mixtral", "deepseek_v3"])
def test_the_first_step_loss_is_transformers_loss_of_the_first_batch(arch, folders, references):
    """The import really starts from the folder's weights: the first step's loss is transformers'
    on the same batch."""
    from launch.config import compose
    from launch.train import build_loaders

    cfg = compose(["model=hf", f"model.hf_path={folders[arch]}", *RUN, "run_dir=unused"])
    batches = build_loaders(cfg, cfg.model.vocab_size, 0, 1)[0].step(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folders[arch]).eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(model(b.tokens).logits.flatten(0, 1), b.labels.flatten(), reduction="sum",
                                    ignore_index=-100) for b in batches)
    n = sum(int((b.labels != -100).sum()) for b in batches)
    assert abs(float(total) / n - references[arch][0]["loss"]) <= RTOL["float32"] * references[arch][0]["loss"]


# The layouts the default suite runs; pp2-vpp2 and etp2 read the same blocks in other
# rectangles (QUINTET_SLOW=1).
SLOW = {"pp2-vpp2", "tp2-sp-ep2-etp2"}


@pytest.mark.parametrize("layout", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [])
                                    for name in LAYOUTS])
def test_an_import_into_any_layout_trains_as_one_process(layout, folders, references, tmp_path):
    arch, world, overrides = LAYOUTS[layout]
    got = train(tmp_path, ["model=hf", f"model.hf_path={folders[arch]}", "train.dtype=float64", *RUN, *overrides],
                world_size=world, small=False)
    compared = list if arch == "qwen3" else total_losses  # MoE: the balancing terms too
    assert_same_losses(compared(references[arch]), compared(got), RTOL["float64"])


def test_an_imported_run_resumes_from_its_own_checkpoint(folders, tmp_path):
    """Stopped after step 2 and relaunched, an imported run continues from its checkpoint (not
    from the folder again): the steps equal the uninterrupted run's."""
    run = ["model=hf", f"model.hf_path={folders['qwen3']}", *RUN, "train.steps=4", "checkpoint.every=2"]
    whole = train(tmp_path / "whole", run, small=False)
    train(tmp_path / "split", [*run, "train.stop_at_step=2"], small=False)
    resumed = train(tmp_path / "split", run, small=False)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]


def test_import_train_export_loads_in_transformers_with_the_same_loss(folders, tmp_path):
    """Import, 10 steps under tp2 × pp2 × dp2, export: transformers' loss on a fixed batch is the
    loss quintet computes from the checkpoint (fp32 bounds)."""
    run, out = tmp_path / "run", tmp_path / "hf"
    train(run, ["model=hf", f"model.hf_path={folders['qwen3']}", *RUN, "train.steps=10", "checkpoint.every=10",
                "parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=2"], world_size=8, small=False)
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(run), str(out), "--shard-size", "300KB"],
                          capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    tokens = torch.randint(0, 1024, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(tokens[:, :-1], labels=tokens[:, :-1]).loss
        logits = load_checkpoint(run)(tokens[:, :-1])
    ours = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:-1].flatten())
    assert abs(float(theirs) - float(ours)) <= RTOL["float32"] * float(ours)
    before = transformers.AutoModelForCausalLM.from_pretrained(folders["qwen3"]).eval()
    with torch.no_grad():
        assert float(before(tokens[:, :-1], labels=tokens[:, :-1]).loss) != float(theirs)  # it did train
