"""Holmes placement and the self-adapting partition in a real run: four one-rank "nodes" whose
NIC classes alternate (ib, ethernet, ib, ethernet), pp=2 × dp=2. Placement and partition change
where work runs, never the numbers: losses equal Megatron's order with an even split."""
import os

from launch.spawn import run_ranks
from runtime.metrics import read_metrics
from tests.training import SMALL, assert_same_losses

NICS = ["ib", "ethernet", "ib", "ethernet"]
BASE = [*SMALL, "model.n_layers=4", "train.micro_batch_size=2", "parallel.pp=2", "parallel.dp_impl=ddp"]


def _node_rank(rank: int, world_size: int, overrides: list[str]):
    from launch.config import compose
    from launch.train import setup

    # One process per node, as torchrun on four machines would number them.
    os.environ.update(GROUP_RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", QUINTET_NIC_CLASS=NICS[rank])
    r = setup(compose(overrides))
    try:
        r.trainer.fit(r.start_step, 0)
    finally:
        r.metrics.close()
    return ({name: t.nic for name, t in r.groups.transports.items()}, list(r.cfg.parallel.pp_layers or []),
            r.groups.index("pp"))


def run(tmp_path, name: str, extra: list[str]):
    run_dir = tmp_path / name
    results = run_ranks(_node_rank, 4, args=([*BASE, *extra, f"run_dir={run_dir}"],), timeout_s=180)
    return results, read_metrics(run_dir)


def test_placement_and_auto_partition_keep_the_numbers(tmp_path):
    naive, ref = run(tmp_path, "megatron", ["parallel.placement=megatron"])
    # Megatron's order: process p is logical rank p, so DP pairs {0, 2} and {1, 3} mix classes.
    assert [t["dp"] for t, _, _ in naive] == ["mixed"] * 4
    placed, got = run(tmp_path, "holmes", ["parallel.placement=holmes", "parallel.pp_layers=auto"])
    assert [t["dp"] for t, _, _ in placed] == ["ib", "ethernet", "ib", "ethernet"]
    assert [t["pp"] for t, _, _ in placed] == ["mixed"] * 4  # only the pipeline crosses classes
    assert [stage for _, _, stage in placed] == [0, 1, 0, 1]  # the ib processes hold stage 0
    layers = {tuple(p) for _, p, _ in placed}
    assert len(layers) == 1 and sum(layers.pop()) == 4, "every rank must agree on the auto partition"
    assert_same_losses(ref, got, rtol=1e-5)
