"""The planner's layout space: what launch.validate accepts, nothing it refuses."""
from launch.config import compose
from launch.planner.layouts import candidates, valid_layouts


def test_valid_layouts_are_those_validation_accepts():
    cfg = compose(["model=tiny", "model.n_layers=3", "train.global_batch_size=4", "run_dir=unused"])
    valid = [layout for layout, _ in valid_layouts(cfg, 2)]
    everything = list(candidates(cfg, 2))
    assert valid and len(valid) < len(everything)
    assert all(layout.pp == 1 for layout in valid)  # 3 layers do not split over 2 stages
    assert {(lay.tp, lay.cp, lay.dp) for lay in valid} == {(1, 1, 2), (2, 1, 1), (1, 2, 1)}
    assert {lay.micro_batch_size for lay in valid if lay.dp == 2} == {1, 2}  # 4 sequences over 2 ranks
    assert {lay.activation_checkpoint for lay in valid} == {"none", "selective", "full"}


def test_moe_layouts_offer_expert_parallelism_and_fssdp():
    cfg = compose(["model=tiny_moe", "train.global_batch_size=2", "run_dir=unused"])
    valid = [layout for layout, _ in valid_layouts(cfg, 2)]
    assert {(lay.ep, lay.moe_backend) for lay in valid if lay.dp == 2} == {(1, "ep"), (2, "ep"), (2, "fssdp")}
    assert "tp1 pp1 cp1 dp2 ep2-fssdp mb1" in {lay.describe() for lay in valid}
