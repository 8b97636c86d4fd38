"""`python -m launch.export` from training runs: a tied Llama 3.2-shaped model trained on two
pipeline stages and saved by the DCP engine loads in transformers with quintet's logits; what
has no transformers architecture is refused. (Every architecture against transformers, and the
bitwise round trip: tests/unit/test_hf.py; import, train, export: tests/dist/test_hf_import.py.)"""
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from launch.load import load_checkpoint
from tests.training import train
from launch.spawn import scaled

REPO = Path(__file__).resolve().parents[2]


def test_export_refuses_what_has_no_transformers_equivalent(tmp_path):
    run = tmp_path / "ladder"
    train(run, ["model.residual=ladder", "train.steps=1", "checkpoint.every=1"])
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(run), str(tmp_path / "x")], cwd=REPO,
                          capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 2 and "the ladder residual has no transformers architecture" in proc.stderr
    assert not (tmp_path / "x").exists()
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(tmp_path / "nothing"), str(tmp_path / "y")],
                          cwd=REPO, capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 2 and "neither a checkpoint" in proc.stderr


def test_a_tied_llama_3_2_shaped_model_exports_to_transformers(tmp_path):
    """Tied embeddings, a head size of its own and Llama 3.1's RoPE scaling, read by transformers'
    own LlamaForCausalLM: the same logits as quintet's, to fp32's precision (transformers computes
    the rotary angles in fp32 even for an fp64 model; the exact fp64 check is the test above).
    Saved by the DCP engine, trained with the tied matrix on two pipeline stages."""
    from transformers import LlamaForCausalLM

    features = ["model.head_dim=32", "model.tie_embeddings=true", "model.rope_scaling.type=llama3",
                "model.rope_scaling.original_max_position_embeddings=16", "model.rope_theta=500000"]
    run = tmp_path / "run"
    train(run, [*features, "train.steps=3", "checkpoint.every=3", "checkpoint.engine=dcp_async", "parallel.pp=2"],
          world_size=2)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(run), str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    model = load_checkpoint(run, torch.float64)
    assert model.output.weight is model.tok_embeddings.weight
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float64).eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
