"""Options of the training run that the parity tests do not cover: bf16 autocast, synthetic data."""
import pytest

from tests.training import losses, train


@pytest.mark.parametrize("layout", [["parallel.dp=2"], ["parallel.tp=2", "parallel.sp=true"]])
def test_bfloat16_autocast_tracks_fp32_within_its_tolerance(tmp_path, layout):
    """bf16 is allowed to differ (DESIGN.md Section 5); its documented bound is 2% per step
    over 20 steps of the small model."""
    ref = train(tmp_path / "fp32", ["train.dtype=float32"])
    bf16 = train(tmp_path / "bf16", ["train.dtype=bfloat16", *layout], world_size=2)
    worst = max(abs(a - b) / a for a, b in zip(losses(ref), losses(bf16)))
    assert 0 < worst < 0.02, worst  # > 0: autocast really ran in bf16


def test_synthetic_data_is_learnable(tmp_path):
    records = train(tmp_path, ["data=synthetic", "train.steps=60", "train.lr=1e-2"])
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
