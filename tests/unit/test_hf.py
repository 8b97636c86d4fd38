"""quintet runs Hugging Face checkpoints as transformers does: for a small random model of each
supported architecture, created and saved by transformers inside the test, quintet's import
(launch.load.load_hf, the reader every rank of a parallel import uses) gives transformers'
logits (fp32 within 1e-5; fp64 within 1e-9) and its greedy generation, and a model exported
back is bitwise the one imported."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from launch.config import compose  # noqa: E402
from launch.export import export  # noqa: E402
from launch.load import load_checkpoint, load_hf  # noqa: E402
from launch.preflight import hf_tensor_problems  # noqa: E402
from launch.validate import ConfigError, validate  # noqa: E402
from runtime.checkpoint.format import StateBlock  # noqa: E402
from runtime.checkpoint.format import write_shard  # noqa: E402
from runtime.checkpoint.sync import BaseCheckpointer  # noqa: E402
from runtime.generate import generate  # noqa: E402
from tests.hf_models import ARCHITECTURES, save_random  # noqa: E402

def hf_model(folder, arch: str, dtype: torch.dtype):
    model_cls = getattr(transformers, ARCHITECTURES[arch][1])
    moe = arch in ("qwen3_moe", "mixtral") or arch.startswith("deepseek")
    kwargs = {"experts_implementation": "eager"} if moe else {}  # grouped_mm lacks fp64
    return model_cls.from_pretrained(folder, dtype=dtype, **kwargs).eval()


def inverse_frequencies_fp64(config) -> torch.Tensor:
    """The rotation rates transformers' rope initialisation computes (default, Llama 3.1's and
    YaRN's scaling as its `_compute_llama3_parameters` and `_compute_yarn_parameters` do),
    transcribed in fp64."""
    params = config.rope_parameters
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv = 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if params["rope_type"] == "default":
        return inv
    if params["rope_type"] == "yarn":
        base, old = params["rope_theta"], params["original_max_position_embeddings"]

        def correction(rotations):
            return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))
        low, high = max(math.floor(correction(params["beta_fast"])), 0), min(math.ceil(correction(params["beta_slow"])), dim - 1)
        extrapolation = 1 - ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        return inv / params["factor"] * (1 - extrapolation) + inv * extrapolation
    old, low, high = params["original_max_position_embeddings"], params["low_freq_factor"], params["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / params["factor"], inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / params["factor"] + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def without_fp32_islands(model) -> None:
    """transformers computes three things in fp32 whatever the model's dtype: the rotary angles,
    RMSNorm and the router's softmax. For the fp64 comparison those modules compute in the
    model's dtype, as their own code does otherwise; the rest is transformers' unchanged."""
    inv = inverse_frequencies_fp64(model.config)

    scaling = model.model.rotary_emb.attention_scaling

    def rotary(x, position_ids):
        angles = position_ids[:, :, None].double() * inv
        emb = torch.cat([angles, angles], dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)

    def rms_norm(module):
        return lambda x: module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

    def router(module, normalize):
        def forward(hidden):
            logits = F.linear(hidden.reshape(-1, module.weight.shape[1]), module.weight)
            top, idx = torch.topk(logits.softmax(dim=-1), module.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True) if normalize else top, idx
        return forward

    def deepseek_router(m):
        """DeepseekV3TopkRouter.forward with its logits in the model's dtype, not fp32."""
        def forward(hidden):
            scores = F.linear(hidden.reshape(-1, m.hidden_dim), m.weight.to(hidden.dtype)).sigmoid()
            choice = scores + m.e_score_correction_bias.to(hidden.dtype)
            groups = choice.view(-1, m.num_group, m.num_experts // m.num_group)
            best = groups.topk(2, dim=-1)[0].sum(dim=-1).topk(m.topk_group, dim=-1)[1]
            keep = torch.zeros_like(groups[..., 0]).scatter_(1, best, 1).bool()
            idx = choice.view_as(groups).masked_fill(~keep[..., None], 0.0).view_as(choice).topk(m.top_k, dim=-1)[1]
            weights = scores.gather(1, idx)
            if m.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return None, weights * m.routed_scaling_factor, idx
        return forward

    model.model.rotary_emb.forward = rotary
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = rms_norm(module)
        elif name.endswith("TopKRouter"):
            module.forward = router(module, getattr(module, "norm_topk_prob", True))
        elif name == "DeepseekV3TopkRouter":
            module.forward = deepseek_router(module)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {arch: save_random(arch, tmp_path_factory.mktemp(arch)) for arch in ARCHITECTURES}


TOKENS = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_equal_transformers(arch, folders):
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-9)):
        theirs = hf_model(folders[arch], arch, dtype)
        if dtype == torch.float64:
            without_fp32_islands(theirs)
        ours = load_hf(folders[arch], dtype)
        with torch.no_grad():
            expected, got = theirs(TOKENS).logits, ours(TOKENS)
        scale = expected.abs().max()
        assert (got - expected).abs().max() <= rtol * scale, f"{arch} {dtype}: {(got - expected).abs().max() / scale:.2e}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_equals_transformers(arch, folders):
    prompt = TOKENS[:, :8]
    theirs = hf_model(folders[arch], arch, torch.float32)
    expected = theirs.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    got = generate(load_hf(folders[arch], torch.float32), prompt, max_new_tokens=32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_import_then_export_is_bitwise_the_input(arch, folders, tmp_path):
    """The folder's tensors through quintet's layout (load_hf), a quintet checkpoint and the
    exporter come back bit for bit, in shards of the size asked for; transformers loads the
    export, with its tokenizer."""
    from safetensors.torch import load_file

    save_checkpoint(tmp_path / "ckpt", load_hf(folders[arch]), folders[arch])
    out = tmp_path / "out"
    files = export(tmp_path / "ckpt", out, shard_bytes=200_000)
    assert len(files) > 1 and (out / "model.safetensors.index.json").exists()
    original = load_file(folders[arch] / "model.safetensors")
    exported = {k: v for f in files for k, v in load_file(f).items()}
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 128 and config["architectures"] == [ARCHITECTURES[arch][1]]
    reloaded = hf_model(out, arch, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, hf_model(folders[arch], arch, torch.float32)(TOKENS).logits,
                                   rtol=0, atol=0)


def save_checkpoint(directory, model, folder, **changes) -> None:
    """`model` (imported from `folder`, with model config `changes`) as a one-rank quintet
    checkpoint, as a run saves it."""
    from omegaconf import OmegaConf

    from launch.load import model_config
    from runtime.hf.config import model_fields

    fields = model_fields(json.loads((folder / "config.json").read_text()))
    config = OmegaConf.to_container(model_config({**fields, "name": "hf", "hf_path": str(folder), **changes}), resolve=True,
                                    enum_to_str=True)
    saver = BaseCheckpointer(str(directory), 0, 0, model=config)
    write_shard(saver.step_path(1), 0, [
        StateBlock(f"{'model' if isinstance(t, torch.nn.Parameter) else 'buffer'}/{n}", t.data, tuple(t.shape),
                   tuple(slice(0, s) for s in t.shape)) for n, t in [*model.named_parameters(), *model.named_buffers()]])
    saver.publish(1, {"step": 1})


def test_multi_token_prediction_blocks_are_left_out_of_an_export(folders, tmp_path):
    """A DeepSeek-V3 import trained with an MTP block (model.mtp_depth=1) exports as the folder it
    came from, as Hugging Face checkpoints leave the block out."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from runtime.model import Transformer

    folder = folders["deepseek_v3"]
    imported = load_hf(folder)
    model = Transformer(replace(imported.args, mtp_depth=1))
    model.load_state_dict(imported.state_dict(), strict=False)  # the MTP block keeps its own values
    assert any(n.startswith("layers.2.") for n, _ in model.named_parameters())
    save_checkpoint(tmp_path / "ckpt", model, folder, mtp_depth=1)
    files = export(tmp_path / "ckpt", tmp_path / "out")
    original = load_file(folder / "model.safetensors")
    exported = {k: v for f in files for k, v in load_file(f).items()}
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_deepseeks_mtp_layer_in_a_folder_is_skipped_and_mtp_starts_from_its_own_values(folders, tmp_path):
    """DeepSeek's releases carry the MTP block as layer num_hidden_layers, which transformers skips:
    so does the import's check. With model.mtp_depth=1 the block starts from the model's own
    initial values (`fallback`), every other tensor from the folder."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from launch.load import hf_args
    from parallel.materialize import initial_values
    from runtime.hf.checkpoint import HFFolder
    from runtime.model import Transformer

    folder = tmp_path / "released"
    shutil.copytree(folders["deepseek_v3"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)  # layer 2 of a 2-layer model: MTP
    save_file(tensors, folder / "model.safetensors")
    args = replace(hf_args(folder), mtp_depth=1)
    with torch.device("meta"):
        model = Transformer(args)
    own = initial_values(model.init_full, 0)
    source = HFFolder(folder, args, fallback=own)
    assert source.problems() == []
    whole = ((slice(0, 64), slice(0, 128)),)
    assert torch.equal(source.values("layers.2.eh_proj.weight", (64, 128), whole)[0],
                       own("layers.2.eh_proj.weight", (64, 128), whole)[0])
    assert torch.equal(source.values("norm.weight", (64,), ((slice(0, 64),),))[0], tensors["model.norm.weight"])


def problems_of(folder, data: str = "synthetic") -> list[str]:
    cfg = compose(["model=hf", f"model.hf_path={folder}", f"data={data}", "run_dir=/x"])
    try:
        validate(cfg, 1)
    except ConfigError as e:
        return e.problems
    return hf_tensor_problems(cfg.model)


def test_bad_folders_are_refused_naming_the_key_or_tensor(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    assert problems_of(folders["qwen3"]) == []
    assert problems_of(tmp_path / "nowhere")[0].startswith(f"model.hf_path={tmp_path / 'nowhere'}: cannot read")

    def variant(name, edit_config=None, edit_tensors=None, data="synthetic"):
        folder = tmp_path / name
        shutil.copytree(folders["qwen3"], folder)
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        if edit_tensors:
            tensors = load_file(folder / "model.safetensors")
            edit_tensors(tensors)
            save_file(tensors, folder / "model.safetensors")
        return problems_of(folder, data)

    assert "architectures=['GPT2LMHeadModel'] is not one quintet runs" in variant(
        "gpt2", lambda c: c.update(architectures=["GPT2LMHeadModel"]))[0]
    assert "rope_type='dynamic' is not supported" in variant(
        "dynamic", lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}))[0]
    assert "rope_parameters.attention_factor is not supported with YaRN" in variant(
        "yarn", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                    "original_max_position_embeddings": 32, "attention_factor": 2.0}))[0]
    assert "hidden_act='gelu'" in variant("gelu", lambda c: c.update(hidden_act="gelu"))[0]
    assert "quantization_config (quant_method='fp8')" in variant(
        "fp8", lambda c: c.update(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}))[0]
    assert "config.json has no 'hidden_size'" in variant("no-size", lambda c: c.pop("hidden_size"))[0]
    [missing] = variant("missing", edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    assert "lacks 1 tensor(s)" in missing and "model.layers.1.self_attn.k_norm.weight" in missing
    [extra] = variant("extra", edit_tensors=lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(1)}))
    assert "model.layers.2.mlp.up_proj.weight" in extra and "does not explain" in extra
    [shape] = variant("shape", edit_tensors=lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    assert "model.norm.weight is [65], expected [64]" in shape
    [dtype] = variant("dtype", edit_tensors=lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    assert "model.norm.weight is stored as I32, not a floating-point type" in dtype
    # Files that are not what they claim: cut short, or not safetensors at all (only JSON and raw
    # numbers are ever decoded; nothing is unpickled).
    def cut(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:len(data) // 2])

    def garbage(folder):
        (folder / "model.safetensors").write_bytes(b"\x80\x04\x95 not a safetensors file")

    for name, damage, message in (("cut", cut, "is malformed or outside the file"),
                                  ("garbage", garbage, "is not a safetensors file")):
        folder = tmp_path / name
        shutil.copytree(folders["qwen3"], folder)
        damage(folder)
        [problem] = problems_of(folder)
        assert message in problem and "model.safetensors" in problem
    # The tokenizer (1,024 ids) does not fit the vocabulary config.json gives the model.
    [vocab] = variant("vocab", lambda c: c.update(vocab_size=1000), lambda t: t.update(
        {"model.embed_tokens.weight": t["model.embed_tokens.weight"][:1000],
         "lm_head.weight": t["lm_head.weight"][:1000]}), data="sample")
    assert "model.vocab_size=1000 is smaller than the vocabulary of data.tokenizer" in vocab


def test_model_hf_without_a_path_is_refused():
    with pytest.raises(ConfigError, match="model=hf needs model.hf_path=DIR"):
        validate(compose(["model=hf", "run_dir=/x"]), 1)


def test_a_quintet_checkpoint_loads_for_generation(tmp_path, folders):
    """load_checkpoint is the public way to use a checkpoint in one process."""
    model = load_hf(folders["llama"])
    save_checkpoint(tmp_path, model, folders["llama"])
    loaded = load_checkpoint(tmp_path)
    assert torch.equal(generate(loaded, TOKENS[:, :4], 8), generate(model, TOKENS[:, :4], 8))
    assert math.isfinite(float(loaded(TOKENS).sum()))
