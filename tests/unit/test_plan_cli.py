"""`python -m launch.plan`: the ranked table, the written layout launch.train accepts, memory as
a hard limit, and the messages for bad input and for a model that fits nowhere."""
import json
from pathlib import Path

import pytest

from launch.config import CONFIG_DIR, compose
from launch.plan import main
from launch.validate import validate
from launch.planner.layouts import Layout

GIB = 2**30


def _calibration(tmp_path, processes, memory_gib=8.0):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({
        "processes": processes, "device_flops": 5e10, "device_flops_shared": 2.5e10, "memory_bandwidth": 1e10,
        "block_overhead_s": 1e-3, "floor_bytes": 0.5 * GIB, "memory_bytes": memory_gib * GIB,
        "links": {"intra": 4e9}, "latency_s": 1e-4, "loaded_latency_s": 1e-3, "model": "tiny",
        "collective_cost": {"reduce_scatter": 2.0}, "collective_call_s": 1e-3,
        "fsdp_cost": {"hook_s": 1e-3, "gather_s": 5e-9, "reduce_s": 5e-9},
        "memory": {"block_bytes_per_token": 20e3, "attention_share": 0.3, "layer_heap_bytes_per_token": 8e3,
                   "ends_heap_bytes_per_token": 10e3}}))
    return str(path)


ONE_NODE = [[0, 0, "ethernet"], [0, 1, "ethernet"]]


def test_plan_prints_the_ranking_and_writes_a_layout_train_accepts(tmp_path, capsys):
    calibration = _calibration(tmp_path, ONE_NODE)
    main(["world_size=2", "model=tiny", "--calibration", calibration, "--top", "3"])
    table = capsys.readouterr().out
    assert "layouts fit 8.00 GiB per rank" in table and len(table.splitlines()) == 4 + 3
    name = f"planned_test_{tmp_path.name[-12:]}"
    written = CONFIG_DIR / "parallel" / f"{name}.yaml"
    try:
        main(["world_size=2", "model=tiny", "--calibration", calibration, "--json", "--top", "1000", "--write", name])
        ranked = json.loads(capsys.readouterr().out)
        steps = [r["step_s"] for r in ranked]
        assert steps == sorted(steps)
        assert ranked[0]["layout"] in table.splitlines()[4]
        cfg = compose([f"parallel={name}", "model=tiny", "run_dir=unused"])
        validate(cfg, 2)
        assert Layout.from_config(cfg, 2).describe() == ranked[0]["layout"]  # micro-batch size included
    finally:
        written.unlink(missing_ok=True)


def test_layouts_over_the_memory_limit_are_never_proposed(tmp_path, capsys):
    main(["world_size=2", "model=tiny", "--calibration", _calibration(tmp_path, ONE_NODE), "--json", "--top", "1000",
          "--memory-gib", "0.62"])
    proposed = json.loads(capsys.readouterr().out)
    assert proposed and all(p["memory_bytes"] <= 0.62 * GIB for p in proposed)
    everything_fits = 84  # tiny on two ranks
    assert len(proposed) < everything_fits


def test_a_model_that_fits_nowhere_is_told_by_how_much(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["world_size=2", "model=tiny", "--calibration", _calibration(tmp_path, ONE_NODE), "--memory-gib", "0.4"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert "no layout of model=tiny fits 0.40 GiB per rank on 2 ranks" in err
    assert "GiB per rank," in err and "more" in err


@pytest.mark.parametrize("argv,expected", [
    (["model=tiny"], "give world_size=N"),
    (["world_size=4", "cluster=mixed_4x2"], "describes 8 processes"),
    (["world_size=2", "--write", "configs/x.yaml"], "give a config name"),
    (["world_size=2", "--top", "0"], "--top 0 must be ≥ 1"),
    (["world_size=2", "--probe", "out.json"], "do not go with --probe"),
])
def test_bad_input_is_named(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--calibration", _calibration(tmp_path, ONE_NODE)])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_a_calibration_of_another_cluster_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["world_size=4", "--calibration", _calibration(tmp_path, ONE_NODE)])
    assert exit_info.value.code == 2
    assert "probe this cluster" in capsys.readouterr().err
    for name, text in [("garbage.json", "not json"), ("old.json", '{"world_size": 2}')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            main(["world_size=2", "--calibration", str(tmp_path / name)])
        assert exit_info.value.code == 2 and "is not a probe's file" in capsys.readouterr().err
    older = json.loads(Path(_calibration(tmp_path, ONE_NODE)).read_text())
    del older["fsdp_cost"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    with pytest.raises(SystemExit) as exit_info:
        main(["world_size=2", "--calibration", str(tmp_path / "older.json")])
    assert exit_info.value.code == 2 and "older probe: it lacks fsdp_cost" in capsys.readouterr().err


def test_rehearse_drops_the_layouts_whose_rehearsed_peak_does_not_fit(tmp_path, capsys, monkeypatch):
    """--rehearse runs launch.rehearse on each of the top layouts: the rehearsed peak is reported
    beside the estimate, and a layout whose rehearsal does not fit is dropped."""
    import launch.rehearse as rehearsal

    argv = ["world_size=2", "model=tiny", "model.n_layers=2", "train.seq_len=32", "train.global_batch_size=4",
            "--calibration", _calibration(tmp_path, ONE_NODE), "--json", "--top", "2", "--rehearse"]
    main(argv)
    ranked = json.loads(capsys.readouterr().out)
    assert len(ranked) == 2 and all(0 < r["rehearsed_peak_bytes"] <= 8 * GIB for r in ranked)
    first = ranked[0]["overrides"]

    def too_big_first(opts):  # the fastest layout's busiest rank needs more than a rank has
        peak = 9 * GIB if all(o in opts.overrides for o in first) else GIB
        return {"ranks": [{"rank": 0, "peak": peak}]}

    monkeypatch.setattr(rehearsal, "rehearse", too_big_first)
    main(argv)
    assert [r["layout"] for r in json.loads(capsys.readouterr().out)] == [ranked[1]["layout"]]
