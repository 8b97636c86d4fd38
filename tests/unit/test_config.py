"""Composition and validation of the config, without processes."""
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from launch.config import compose
from launch.validate import ConfigError, validate


def problems(overrides, world_size=1):
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides), world_size)
    return info.value.problems


def test_the_default_config_is_valid_and_typed():
    cfg = compose(["run_dir=/tmp/x"])
    topo = validate(cfg, 4)
    assert (topo.dp, topo.tp, topo.pp, topo.cp) == (4, 1, 1, 1)
    assert cfg.model.name == "tiny" and cfg.data.name == "sample"
    assert OmegaConf.to_yaml(cfg, resolve=True).count("checkpoints") == 1


@pytest.mark.parametrize("override, fragment", [
    ("parallel.tp=two", "Value 'two' of type 'str' could not be converted to Integer"),
    ("train.dtype=half", "Invalid value 'half', expected one of [float32, bfloat16, float64]"),
    ("model=nope", "Could not find 'model/nope'"),
    ("train.stepz=3", "Key 'stepz' not in 'TrainConfig'"),
    # Closed choices are enums: Hydra names the valid values.
    ("parallel.schedule=gpipe", "Invalid value 'gpipe', expected one of [1f1b, interleaved_1f1b, zero_bubble]"),
    ("parallel.cp_impl=flash", "Invalid value 'flash', expected one of [ring, ulysses]"),
    ("parallel.moe_backend=sharded", "Invalid value 'sharded', expected one of [ep, fssdp]"),
    ("train.compile_mode=fast", "expected one of [default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs]"),
    ("model.residual=rungs", "Invalid value 'rungs', expected one of [standard, ladder]"),
])
def test_composition_rejects_wrong_types_and_names(override, fragment):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert fragment in str(info.value) + str(info.value.__cause__)


def test_all_problems_are_reported_together_with_their_values():
    # First every value against its range (nothing divides by a zero), then the rules between values.
    found = problems(["run_dir=/x", "parallel.tp=0", "train.seq_len=0", "train.lr=nan", "optim.beta1=1.5"], 2)
    assert found == ["parallel.tp=0 must be ≥ 1", "train.seq_len=0 must be ≥ 1", "train.lr=nan must be > 0",
                     "optim.beta1=1.5 must be ≥ 0 and < 1"]
    found = problems(["run_dir=/x", "parallel.dp=3", "model.n_heads=6", "model.n_kv_heads=4"], world_size=2)
    assert "tp·cp·dp·pp = 1·1·3·1 = 3 but the world size is 2" in found[0]
    assert "model.dim=256 is not divisible by model.n_heads=6" in found[1]
    assert "model.n_heads=6 is not divisible by model.n_kv_heads=4" in found[2]


def test_world_size_must_fill_dp_evenly():
    (msg,) = problems(["run_dir=/x", "parallel.tp=2"], 3)
    assert "world size 3 is not divisible by tp·cp·pp = 2·1·1 = 2, so parallel.dp=-1 has no value" in msg
    (msg,) = problems(["run_dir=/x", "parallel.dp=0"], 2)
    assert msg == "parallel.dp=0 must be ≥ 1 or -1 (-1 = world size / (tp·pp·cp))"


def test_batch_must_split_over_data_parallel_microbatches():
    (msg,) = problems(["run_dir=/x", "train.global_batch_size=16", "train.micro_batch_size=8"], world_size=4)
    assert msg.startswith("train.global_batch_size=16 is not divisible by train.micro_batch_size × "
                          "data-parallel size = 8 × 4 = 32")


@pytest.mark.parametrize("overrides, expected", [
    (["data=tokens"], "data=tokens needs exactly one of data.path=PATH and data.blend=[[WEIGHT,PATH],...]"),
    (["data=indexed", "data.path=a", "data.blend=[[1,b]]"], "needs exactly one of data.path=PATH and data.blend"),
    (["model.vocab_size=100"], "model.vocab_size=100 is smaller than the vocabulary of data.tokenizer=sample (1024 ids)"),
    (["data.tokenizer=nowhere/tok.json"], "data.tokenizer=nowhere/tok.json does not exist"),
    (["data=indexed", "data.blend=[[0.5,a],[-1,b]]"], "data.blend: the weight -1 of b must be a finite number ≥ 0"),
    (["data=indexed", "data.blend=[[0,a],[0,b]]"], "data.blend: the weights sum to 0; at least one must be positive"),
    (["data=indexed", "data.blend=[a,b]"], "must be a non-empty list of [WEIGHT, PATH] pairs"),
    (["data=sample", "data.path=x"], "data.path=x only applies with data=tokens or data=indexed"),
    (["data=indexed", "data.path=x", "data.dtype=uint16"], "does not apply to an indexed dataset"),
    (["eval.every=5"], "eval.every=5 needs validation data"),
    (["data.valid_fraction=0.1"], "but eval.every=0: set eval.every=N"),
    (["data.valid_fraction=0.1", "data.valid_path=v", "eval.every=1"], "each choose the validation data; give one"),
    (["data=synthetic", "data.document_mask=true"], "data=synthetic has no documents"),
])
def test_data_config_problems_need_no_data_file(overrides, expected):
    (msg,) = problems(["run_dir=/x", *overrides])
    assert expected in msg


def test_odd_head_size_is_rejected_for_rotary():
    (msg,) = problems(["run_dir=/x", "model.dim=24", "model.n_heads=8", "model.n_kv_heads=4"])
    assert "head size model.dim/model.n_heads = 24/8 = 3 is odd" in msg


def test_stop_at_step_within_the_run():
    (msg,) = problems(["run_dir=/x", "train.steps=10", "train.stop_at_step=11"])
    assert "train.stop_at_step=11 must be between 0 (off) and train.steps=10" in msg


def test_run_dir_is_shared_by_job_id(monkeypatch):
    from launch import env

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    env.default_run_dir.cache_clear()
    with pytest.raises(env.RunDirError, match="run_dir is not set and this torchrun launch of 2 processes"):
        env.default_run_dir()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    env.default_run_dir.cache_clear()
    assert env.default_run_dir() == "runs/abc"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    env.default_run_dir.cache_clear()
    assert env.default_run_dir() == "runs/slurm-42"
    env.default_run_dir.cache_clear()


@pytest.mark.parametrize("overrides, world, fragment", [
    (["parallel.tp=3", "parallel.dp=1"], 3, "model.n_heads=8 is not divisible by parallel.tp=3"),
    (["model.n_heads=12", "model.dim=384", "model.n_kv_heads=6", "parallel.tp=4"], 4,
     "model.n_kv_heads=6 and parallel.tp=4: KV heads are split over TP ranks when tp divides them, or replicated"),
    (["model.ffn_dim=690", "parallel.tp=4"], 4, "model.ffn_dim=690 (the MLP hidden size) is not divisible by parallel.tp=4"),
    (["parallel.sp=true"], 2, "parallel.sp=true needs parallel.tp > 1"),
    (["parallel.sp=true", "parallel.tp=2", "train.seq_len=255"], 2, "train.seq_len=255 is not divisible by parallel.tp=2"),
    (["parallel.dp_replicate=3"], 4, "parallel.dp_replicate=3 must divide the data-parallel ranks dp·cp = 4·1 = 4"),
    (["parallel.dp_replicate=2", "parallel.dp_impl=ddp", "train.micro_batch_size=4"], 4,
     "parallel.dp_replicate=2 (HSDP) needs parallel.dp_impl=fsdp, not ddp"),
])
def test_tensor_parallel_problems_are_named(overrides, world, fragment):
    assert any(fragment in p for p in problems(["run_dir=/x", *overrides], world)), problems(["run_dir=/x", *overrides], world)


def test_kv_heads_may_be_fewer_than_tp_ranks():
    validate(compose(["run_dir=/x", "parallel.tp=8", "model.n_kv_heads=4"]), 8)  # replicated: fine


@pytest.mark.parametrize("overrides, world, fragment", [
    (["parallel.pp=2", "model.n_layers=5"], 2, "model.n_layers=5 is not divisible by pp·vpp = 2·1 = 2; set parallel.pp_layers"),
    (["parallel.pp=2", "parallel.pp_layers=[3,2]"], 2, "parallel.pp_layers=[3, 2] must be counts ≥ 0 summing to model.n_layers=4"),
    (["parallel.pp=4", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b", "model.n_layers=8",
      "train.micro_batch_size=8"], 4,
     "the interleaved schedule needs at least pp=4 microbatches per step, but train.global_batch_size / "
     "(micro_batch_size × dp) = 16 / (8 × 1) = 2"),
    (["parallel.pp=4", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b", "model.n_layers=8",
      "train.global_batch_size=24", "train.micro_batch_size=4"], 4,
     "6 microbatches per step in groups of parallel.pp_group_size=4 leave a last group of 2 < pp=4"),
    (["parallel.vpp=2"], 1, "parallel.vpp=2 needs pipeline parallelism (parallel.pp > 1)"),
    (["parallel.pp=2", "parallel.vpp=2"], 2, "parallel.schedule=1f1b runs one chunk per rank but parallel.vpp=2"),
    (["parallel.pp=2", "parallel.schedule=zero_bubble", "parallel.dp=2", "train.micro_batch_size=2"], 4,
     "parallel.schedule=zero_bubble defers weight gradients past each block's backward, where FSDP2"),
    (["parallel.pp=2", "parallel.pp_layers=7"], 2, "parallel.pp_layers=7 must be a list of 2 layer counts, auto, or null"),
])
def test_pipeline_problems_are_named(overrides, world, fragment):
    found = problems(["run_dir=/x", *overrides], world)
    assert any(fragment in p for p in found), found


@pytest.mark.parametrize("overrides, world, fragment", [
    (["parallel.cp=2", "train.seq_len=250"], 2, "train.seq_len=250 is not divisible by 2·cp = 4: context parallelism cuts"),
    (["parallel.cp=4", "parallel.cp_impl=ulysses", "model.n_heads=6", "model.dim=192", "model.n_kv_heads=6"], 4,
     "parallel.cp_impl=ulysses splits the attention heads over the CP ranks: model.n_heads / tp = 6 / 1 = 6 is not divisible by parallel.cp=4"),
    (["parallel.cp=2", "parallel.tp=4", "parallel.sp=true", "train.seq_len=20"], 8,
     "train.seq_len / cp = 20 / 2 = 10 tokens per CP rank is not divisible by parallel.tp=4"),
])
def test_context_parallel_problems_are_named(overrides, world, fragment):
    found = problems(["run_dir=/x", *overrides], world)
    assert any(fragment in p for p in found), found


@pytest.mark.parametrize("overrides, world, fragment", [
    (["model=tiny_moe", "parallel.ep=3", "model.moe.num_experts=8"], 3,
     "model.moe.num_experts=8 is not divisible by parallel.ep=3"),
    (["model=tiny_moe", "model.moe.top_k=9"], 1, "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
    (["model=tiny_moe", "parallel.ep=3", "parallel.dp=2"], 2, "etp·ep = 1·3 = 3 does not divide the ranks of a pipeline stage"),
    (["model=tiny_moe", "parallel.tp=2", "parallel.ep=2", "parallel.etp=1"], 2, "MoE with parallel.tp=2 needs parallel.sp=true"),
    (["model=tiny_moe", "parallel.tp=2", "parallel.sp=true", "model.moe.expert_ffn_dim=343"], 2,
     "the expert hidden size 343 (model.moe.expert_ffn_dim) is not divisible by the expert tensor-parallel size etp=2"),
    (["parallel.ep=2"], 2, "parallel.ep=2 needs a model with experts"),
])
def test_moe_problems_are_named(overrides, world, fragment):
    found = problems(["run_dir=/x", *overrides], world)
    assert any(fragment in p for p in found), found


@pytest.mark.parametrize("overrides, world, fragment", [
    (["model=tiny_moe", "parallel.moe_backend=fssdp", "parallel.ep=2", "parallel.dp=4", "train.micro_batch_size=2"], 4,
     "parallel.moe_backend=fssdp shards whole experts over all 4 ranks of a pipeline stage: set parallel.ep=4 and parallel.etp=1"),
    (["parallel.moe_backend=fssdp"], 1, "parallel.moe_backend=fssdp needs a model with experts"),
])
def test_fssdp_problems_are_named(overrides, world, fragment):
    found = problems(["run_dir=/x", *overrides], world)
    assert any(fragment in p for p in found), found


@pytest.mark.parametrize("overrides, world, fragment", [
    (["model=tiny_deepseek", "model.n_kv_heads=4"], 1,
     "model.n_kv_heads=4 with multi-head latent attention (model.mla.kv_lora_rank=32): every query head has its own"),
    (["model=tiny_deepseek", "model.mla.qk_rope_head_dim=15"], 1, "model.mla.qk_rope_head_dim=15 is odd"),
    (["model=tiny_deepseek", "model.qk_norm=true"], 1, "model.qk_norm: options of grouped-query attention"),
    (["model.mla.q_lora_rank=64"], 1, "model.mla.q_lora_rank=64 only apply with multi-head latent attention"),
    (["model.rope_scaling.mscale_all_dim=1.0"], 1, "only apply with model.rope_scaling.type=llama3 or yarn"),
    (["model.mtp_loss_weight=0.3"], 1, "model.mtp_loss_weight=0.3 only applies with model.mtp_depth > 0"),
    (["model=tiny_deepseek", "model.mtp_depth=1", "parallel.cp=2"], 2,
     "model.mtp_depth=1 with parallel.cp=2 is not supported"),
    (["model.mtp_depth=1", "model.residual=ladder"], 1, "model.residual=ladder with model.mtp_depth=1 is not supported"),
])
def test_latent_attention_and_multi_token_prediction_problems_are_named(overrides, world, fragment):
    found = problems(["run_dir=/x", *overrides], world)
    assert any(fragment in p for p in found), found
