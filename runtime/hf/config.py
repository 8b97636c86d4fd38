"""A Hugging Face `config.json` ↔ quintet's model config, for the architectures quintet runs.

    fields = model_fields(json.load(open("DIR/config.json")))   # quintet's model.* values
    config = hf_config(model_cfg, dtype, ...)                   # a config.json for transformers

Five architectures are Llama-style decoders that differ in a few switches, which is all quintet
needs to know of them: biases on q/k/v (Qwen2), RMSNorm on each head's queries and keys (Qwen3),
and Mixture-of-Experts feed-forwards (Mixtral: every layer, top-k renormalised; Qwen3-MoE: the
layers outside `mlp_only_layers`, renormalised when `norm_topk_prob`). The sixth, DeepSeek-V3,
has multi-head latent attention (model.mla), YaRN, and DeepSeekMoE routing (sigmoid scores, the
balancing bias, node-limited groups, shared experts, the first layers dense). Whatever a config says
that quintet does not compute (another activation, sliding windows, another RoPE scaling, an
output-projection bias) is refused by name, never ignored.
"""
from __future__ import annotations

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
                 "DeepseekV3ForCausalLM": "deepseek_v3"}
MOE = ("qwen3_moe", "mixtral", "deepseek_v3")


class HFConfigError(ValueError):
    """A config.json quintet cannot run: the message names the key and what would be valid."""


def architecture(config: dict) -> str:
    names = config.get("architectures") or []
    known = [n for n in names if n in ARCHITECTURES]
    if not known:
        raise HFConfigError(f"architectures={names} is not one quintet runs; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[known[0]]


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling or None) from transformers 5's `rope_parameters` or the older
    top-level `rope_theta` / `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return float(theta), None
    if kind == "yarn":
        for key in ("attention_factor", "partial_rotary_factor"):
            if scaling.get(key) is not None:
                raise HFConfigError(f"rope_parameters.{key} is not supported with YaRN: quintet derives the "
                                    "attention factor from mscale and mscale_all_dim and rotates whole heads")
        if scaling.get("truncate", True) is False or scaling.get("factor") is None:
            raise HFConfigError("YaRN with truncate=false or without a factor is not supported")
        return float(theta), {"type": "yarn", "factor": scaling["factor"],
                              "original_max_position_embeddings": scaling["original_max_position_embeddings"],
                              "beta_fast": scaling.get("beta_fast") or 32.0, "beta_slow": scaling.get("beta_slow") or 1.0,
                              "mscale": scaling.get("mscale") or 0.0, "mscale_all_dim": scaling.get("mscale_all_dim") or 0.0}
    if kind != "llama3":
        raise HFConfigError(f"rope_type={kind!r} is not supported: quintet computes the default rotation, "
                            "Llama 3.1's scaling (rope_type=llama3) and YaRN (rope_type=yarn)")
    return float(theta), {"type": "llama3", "factor": scaling["factor"], "low_freq_factor": scaling["low_freq_factor"],
                          "high_freq_factor": scaling["high_freq_factor"],
                          "original_max_position_embeddings": scaling["original_max_position_embeddings"]}


def _refuse_unsupported(config: dict, arch: str) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise HFConfigError(f"hidden_act={config['hidden_act']!r}: quintet's feed-forward is SwiGLU (silu)")
    if config.get("mlp_bias"):
        raise HFConfigError("mlp_bias=true: quintet's feed-forward has no biases")
    if arch in ("llama", "qwen3", "qwen3_moe") and config.get("attention_bias"):
        raise HFConfigError(f"attention_bias=true in a {arch} config: its output projection has a bias, which "
                            "quintet's attention does not (only Qwen2's q/k/v biases are supported)")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?") if isinstance(config["quantization_config"], dict) else "?"
        raise HFConfigError(f"quantization_config (quant_method={method!r}): the weights are quantized (DeepSeek-V3's "
                            "release is FP8 with per-block scales); convert them to bf16 or fp32 first")
    if config.get("use_sliding_window") or (arch == "mixtral" and config.get("sliding_window")):
        raise HFConfigError("sliding-window attention (use_sliding_window / sliding_window) is not supported: "
                            "quintet's attention is full causal")
    if arch == "deepseek_v3":
        if config.get("attention_bias"):
            raise HFConfigError("attention_bias=true in a deepseek_v3 config: quintet's latent attention has no biases")
        if config.get("rope_interleave") is False:
            raise HFConfigError("rope_interleave=false: quintet rotates DeepSeek's interleaved pairs (the released "
                                "checkpoints' layout, rope_interleave=true)")
        if config.get("topk_method", "noaux_tc") != "noaux_tc" or config.get("scoring_func", "sigmoid") != "sigmoid":
            raise HFConfigError(f"topk_method={config.get('topk_method')!r} / scoring_func="
                                f"{config.get('scoring_func')!r}: DeepSeek-V3's routing is noaux_tc over sigmoid scores")
    if arch in MOE and config.get("shared_expert_intermediate_size"):
        raise HFConfigError("shared_expert_intermediate_size: a gated shared expert is not supported")


def moe_every(config: dict) -> int:
    """quintet's `moe.every` for a Qwen3-MoE config (layer i is MoE when i % every == 0), or an
    error when its sparse layers (`decoder_sparse_step`, `mlp_only_layers`) follow another pattern."""
    n = config["num_hidden_layers"]
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
    sparse = {i for i in range(n) if i not in dense and (i + 1) % step == 0}
    for every in range(1, n + 1):
        if sparse == {i for i in range(n) if i % every == 0}:
            return every
    raise HFConfigError(f"the sparse layers {sorted(sparse)} (decoder_sparse_step={step}, mlp_only_layers="
                        f"{sorted(dense)}) are not every k-th layer from layer 0, the pattern quintet's "
                        "model.moe.every expresses")


def model_fields(config: dict) -> dict:
    """quintet's model config values (launch/schema.py ModelConfig) for a config.json."""
    arch = architecture(config)
    _refuse_unsupported(config, arch)
    try:
        theta, scaling = rope_settings(config)
        heads = config["num_attention_heads"]
        fields = {"n_layers": config["num_hidden_layers"], "dim": config["hidden_size"], "n_heads": heads,
                  "n_kv_heads": config.get("num_key_value_heads") or heads, "ffn_dim": config["intermediate_size"],
                  "vocab_size": config["vocab_size"], "norm_eps": config.get("rms_norm_eps", 1e-6),
                  "rope_theta": theta, "head_dim": config.get("head_dim") or 0, "qk_norm": arch in ("qwen3", "qwen3_moe"),
                  "qkv_bias": arch == "qwen2",  # Qwen2 always has q/k/v biases
                  "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
                  "max_position_embeddings": config["max_position_embeddings"],
                  "rope_scaling": scaling or {"type": "none"},
                  "moe": {"num_experts": 0}}
        if arch == "mixtral":
            fields["moe"] = {"num_experts": config["num_local_experts"], "top_k": config["num_experts_per_tok"],
                             "expert_ffn_dim": config["intermediate_size"], "renormalize": True, "every": 1,
                             "aux_loss_coef": config.get("router_aux_loss_coef", 0.0), "z_loss_coef": 0.0}
        elif arch == "deepseek_v3":
            fields["n_kv_heads"] = heads  # MLA: a key and value per query head
            fields["head_dim"] = 0
            fields["mla"] = {"kv_lora_rank": config["kv_lora_rank"], "q_lora_rank": config.get("q_lora_rank") or 0,
                             "qk_nope_head_dim": config["qk_nope_head_dim"],
                             "qk_rope_head_dim": config["qk_rope_head_dim"], "v_head_dim": config["v_head_dim"]}
            # Training settings of the V3 paper: the bias moves by γ = 0.001, the sequence-wise
            # balance loss has α = 0.0001.
            fields["moe"] = {"num_experts": config["n_routed_experts"], "top_k": config["num_experts_per_tok"],
                             "expert_ffn_dim": config["moe_intermediate_size"], "score": "sigmoid",
                             "shared_experts": config.get("n_shared_experts") or 0,
                             "n_group": config.get("n_group") or 1, "topk_group": config.get("topk_group") or 1,
                             "renormalize": bool(config.get("norm_topk_prob", True)),
                             "routed_scaling_factor": config.get("routed_scaling_factor", 1.0),
                             "first_dense": config.get("first_k_dense_replace", 0), "every": 1,
                             "bias_update_rate": 0.001, "aux_loss_coef": 0.0001, "sequence_aux_loss": True,
                             "z_loss_coef": 0.0}
        elif arch == "qwen3_moe":
            experts = config["num_experts"] if "num_experts" in config else config["num_local_experts"]  # transformers 5's name
            fields["moe"] = {"num_experts": experts, "top_k": config["num_experts_per_tok"],
                             "expert_ffn_dim": config["moe_intermediate_size"],
                             "renormalize": bool(config.get("norm_topk_prob", False)), "every": moe_every(config),
                             "aux_loss_coef": config.get("router_aux_loss_coef", 0.0), "z_loss_coef": 0.0}
    except KeyError as e:
        raise HFConfigError(f"config.json has no {e.args[0]!r}, which a {arch} config needs") from None
    return fields


def export_architecture(m) -> str:
    """The transformers architecture of a quintet model config `m`, or HFConfigError saying why
    none computes the same function."""
    moe = m.moe.num_experts > 0
    if str(m.residual) != "standard":
        raise HFConfigError(f"model.residual={m.residual}: the ladder residual has no transformers architecture")
    if m.mla.kv_lora_rank:
        return _deepseek_v3(m)
    if moe and (m.moe.shared_experts or str(m.moe.score) != "softmax" or m.moe.n_group > 1
                or m.moe.routed_scaling_factor != 1 or m.moe.first_dense):
        raise HFConfigError("model.moe.shared_experts, score=sigmoid, n_group, routed_scaling_factor and first_dense "
                            "(DeepSeekMoE routing): Mixtral and Qwen3-MoE have none of them")
    if m.qk_norm and m.qkv_bias:
        raise HFConfigError("model.qk_norm with model.qkv_bias: no supported transformers architecture has both")
    if moe:
        if m.qkv_bias:
            raise HFConfigError("model.qkv_bias with experts: no supported transformers MoE architecture has it")
        if m.qk_norm:
            return "qwen3_moe"
        if not m.moe.renormalize or m.moe.every != 1:
            raise HFConfigError(f"experts without model.qk_norm export as Mixtral, which routes every layer "
                                f"(model.moe.every={m.moe.every}) with renormalised weights "
                                f"(model.moe.renormalize={m.moe.renormalize})")
        return "mixtral"
    return "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias else "llama"


def _deepseek_v3(m) -> str:
    """Multi-head latent attention exports as DeepSeek-V3, whose every layer from
    first_k_dense_replace on routes DeepSeekMoE's way."""
    e = m.moe
    if not e.num_experts or str(e.score) != "sigmoid" or not e.shared_experts or e.every != 1:
        raise HFConfigError(f"multi-head latent attention exports as DeepSeek-V3, whose layers from "
                            f"first_k_dense_replace on are MoE (model.moe.every=1, now {e.every}) with sigmoid scores "
                            f"(model.moe.score, now {e.score}) and shared experts (model.moe.shared_experts ≥ 1, "
                            f"now {e.shared_experts}) over routed ones (model.moe.num_experts, now {e.num_experts})")
    return "deepseek_v3"


def hf_config(m, dtype: str, max_positions: int, bos: int | None, eos: int | None) -> dict:
    """config.json for quintet model config `m` whose weights are stored as `dtype`."""
    arch = export_architecture(m)
    name = {v: k for k, v in ARCHITECTURES.items()}[arch]
    config = {"architectures": [name], "model_type": arch, "hidden_size": m.dim, "intermediate_size": m.ffn_dim,
              "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
              "head_dim": m.head_dim or m.dim // m.n_heads, "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps,
              "rope_theta": m.rope_theta, "hidden_act": "silu", "tie_word_embeddings": bool(m.tie_embeddings),
              "max_position_embeddings": max_positions, "bos_token_id": bos, "eos_token_id": eos,
              "torch_dtype": dtype, "use_cache": True}
    if arch in ("llama", "qwen3", "qwen3_moe", "deepseek_v3"):
        config["attention_bias"] = False
    if arch == "llama":
        config["mlp_bias"] = False
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        config["use_sliding_window"] = False
    if arch == "mixtral":
        config.update(num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k, sliding_window=None,
                      router_aux_loss_coef=m.moe.aux_loss_coef)
        config["intermediate_size"] = m.moe.expert_ffn_dim or m.ffn_dim
    if arch == "qwen3_moe":
        every = m.moe.every
        config.update(num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
                      moe_intermediate_size=m.moe.expert_ffn_dim or m.ffn_dim, norm_topk_prob=bool(m.moe.renormalize),
                      decoder_sparse_step=1, mlp_only_layers=[i for i in range(m.n_layers) if i % every],
                      router_aux_loss_coef=m.moe.aux_loss_coef)
    if arch == "deepseek_v3":
        a, e = m.mla, m.moe
        config.update(num_key_value_heads=m.n_heads, kv_lora_rank=a.kv_lora_rank, q_lora_rank=a.q_lora_rank or None,
                      qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                      v_head_dim=a.v_head_dim, head_dim=a.qk_rope_head_dim, rope_interleave=True,
                      n_routed_experts=e.num_experts, num_experts_per_tok=e.top_k,
                      moe_intermediate_size=e.expert_ffn_dim or m.ffn_dim, n_shared_experts=e.shared_experts,
                      n_group=e.n_group, topk_group=e.topk_group, norm_topk_prob=bool(e.renormalize),
                      routed_scaling_factor=e.routed_scaling_factor, first_k_dense_replace=e.first_dense,
                      num_nextn_predict_layers=0)  # MTP blocks are not exported (transformers skips them)
    r = m.rope_scaling
    if str(r.type) == "yarn":
        config["rope_scaling"] = {"rope_type": "yarn", "factor": r.factor, "beta_fast": r.beta_fast,
                                  "beta_slow": r.beta_slow, "mscale": r.mscale or None,
                                  "mscale_all_dim": r.mscale_all_dim or None,
                                  "original_max_position_embeddings": r.original_max_position_embeddings}
    if str(r.type) == "llama3":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                                  "high_freq_factor": r.high_freq_factor,
                                  "original_max_position_embeddings": r.original_max_position_embeddings}
    return config
