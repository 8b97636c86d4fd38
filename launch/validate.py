"""Every rule of the config, checked on every rank before any process group exists.

Two phases: first the schema's own rules — no key Hydra let in with `+key=value` that the
schema lacks, every number within its range (launch/schema.py), no options that mean nothing
for this model — then, once every value is in range, the cross-field rules (sizes that must
divide). The problems of a phase are collected and reported together, each naming the offending
values and what would be valid; `launch.train` prints them and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from launch import schema
from parallel.compile import CUDA_GRAPH_MODES
from parallel.mesh import Topology, TopologyError
from parallel.pipeline.partition import PartitionError, stage_layers
from runtime.data.tokenizer import TokenizerError, load_tokenizer
from runtime.hf.config import model_fields


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems

    def __str__(self) -> str:
        return "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)


def _schema_nodes(node, cls, prefix: str = ""):
    """(key path, schema class, config node) of `node` and every structured node below it."""
    yield prefix, cls, node
    for f in dataclasses.fields(cls):
        child = node.get(f.name) if not OmegaConf.is_missing(node, f.name) else None
        if isinstance(child, DictConfig):
            kind = OmegaConf.get_type(child)
            if dataclasses.is_dataclass(kind):
                yield from _schema_nodes(child, kind, f"{prefix}{f.name}.")
            else:  # a dict of structured values (cluster.classes)
                for key, value in child.items():
                    if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
                        yield from _schema_nodes(value, OmegaConf.get_type(value), f"{prefix}{f.name}.{key}.")
        elif isinstance(child, ListConfig):  # a list of structured values (cluster.nodes)
            for i, value in enumerate(child):
                if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
                    yield from _schema_nodes(value, OmegaConf.get_type(value), f"{prefix}{f.name}[{i}].")


def _unknown_key_problems(cfg) -> list[str]:
    """Keys the schema does not have. Hydra refuses `parallel.tpp=2`, but `+parallel.tpp=2` (what
    its own error message suggests) adds the key, and nothing would read it."""
    out = []
    for prefix, cls, node in _schema_nodes(cfg, schema.QuintetConfig):
        known = [f.name for f in dataclasses.fields(cls)]
        for key in node.keys():
            if key in known or (not prefix and key == "hydra"):
                continue
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            out.append(f"{prefix}{key} is not a configuration key (added with +{prefix}{key}=...?); {hint}"
                       f"the keys of {prefix.rstrip('.') or 'the config'} are: {', '.join(known)}")
    return out


def _range_problems(cfg) -> list[str]:
    """Every numeric key against its Range in the schema: NaN, infinities and out-of-range values
    stop here, before any rule divides by them."""
    out = []
    for prefix, cls, node in _schema_nodes(cfg, schema.QuintetConfig):
        for f in dataclasses.fields(cls):
            allowed = f.metadata.get("range")
            # A default that copies another key (model.max_position_embeddings = train.seq_len) is
            # that key's value, judged there once.
            if (allowed is None or OmegaConf.is_missing(node, f.name)
                    or OmegaConf.is_interpolation(node, f.name) and node._get_node(f.name)._value() == f.default):
                continue
            value = node.get(f.name)
            if not allowed.accepts(value):
                out.append(f"{prefix}{f.name}={value} must be {allowed.describe()}")
    return out


def _unused_option_problems(cfg) -> list[str]:
    """Options set away from their defaults where nothing reads them: MoE keys on a dense model,
    FSSDP's on the EP backend, ladder_layers with the standard residual, a pipeline split
    without a pipeline. Silently ignoring them would train something other than what the user
    asked for."""
    out = []

    def changed(node, cls, prefix):
        return [f"{prefix}{f.name}={node.get(f.name)}" for f in dataclasses.fields(cls)
                if node.get(f.name) != f.default]

    if cfg.model.moe.num_experts == 0:
        moe = changed(cfg.model.moe, schema.MoEConfig, "model.moe.")
        if moe:
            out.append(f"{', '.join(moe)} set on a dense model (model.moe.num_experts=0): give the model experts "
                       "(model.moe.num_experts=N, or model=tiny_moe) or drop these overrides")
    if cfg.parallel.moe_backend != "fssdp":
        fssdp = changed(cfg.parallel.fssdp, schema.FSSDPConfig, "parallel.fssdp.")
        if fssdp:
            out.append(f"{', '.join(fssdp)} only apply with parallel.moe_backend=fssdp (now "
                       f"{cfg.parallel.moe_backend!r})")
    if cfg.model.rope_scaling.type == "none":
        scaling = [c for c in changed(cfg.model.rope_scaling, schema.RopeScalingConfig, "model.rope_scaling.")
                   if not c.startswith("model.rope_scaling.type")]
        if scaling:
            out.append(f"{', '.join(scaling)} only apply with model.rope_scaling.type=llama3 or yarn")
    if not cfg.model.mla.kv_lora_rank:
        mla = changed(cfg.model.mla, schema.MLAConfig, "model.mla.")
        if mla:
            out.append(f"{', '.join(mla)} only apply with multi-head latent attention (model.mla.kv_lora_rank > 0)")
    if not cfg.model.mtp_depth and cfg.model.mtp_loss_weight != schema.ModelConfig.mtp_loss_weight:
        out.append(f"model.mtp_loss_weight={cfg.model.mtp_loss_weight} only applies with model.mtp_depth > 0")
    if cfg.model.residual == "standard" and cfg.model.ladder_layers:
        out.append(f"model.ladder_layers={cfg.model.ladder_layers} only applies with model.residual=ladder")
    if cfg.parallel.pp == 1 and cfg.parallel.pp_layers is not None:
        out.append(f"parallel.pp_layers={cfg.parallel.pp_layers} only applies with pipeline parallelism (parallel.pp > 1)")
    return out


def tokenizer_problems(cfg) -> list[str]:
    """The tokenizer loads (the only file validation reads: a preset's vocabulary may be the
    tokenizer's), the model's vocabulary holds its ids, and it has the end-of-document token
    that document masking needs."""
    d = cfg.data
    try:
        tok = load_tokenizer(str(d.tokenizer))
    except TokenizerError as e:
        return [str(e)]
    out = []
    if d.name != "synthetic" and cfg.model.vocab_size < tok.vocab_size:
        out.append(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of data.tokenizer="
                   f"{d.tokenizer} ({tok.vocab_size} ids): set model.vocab_size={tok.vocab_size} (or more)")
    if tok.eod_id is None:
        for key in ("document_mask", "mask_eod_loss"):
            if d[key]:
                out.append(f"data.{key}=true needs an end-of-document token, but data.tokenizer={d.tokenizer} has "
                           "none (no eos_token in tokenizer_config.json and none of the usual names)")
    return out


def hf_config_problems(cfg) -> list[str]:
    """model=hf: model.hf_path names a folder whose config.json is an architecture quintet runs
    (configs/model/hf.yaml reads the model's sizes from it)."""
    m = cfg.model
    if m.name == "hf" and not m.hf_path:
        return ["model=hf needs model.hf_path=DIR: a Hugging Face model folder (config.json, safetensors, tokenizer)"]
    if not m.hf_path:
        return []
    path = Path(str(m.hf_path)) / "config.json"
    try:
        model_fields(json.loads(path.read_text()))
    except OSError as e:
        return [f"model.hf_path={m.hf_path}: cannot read {path} ({e.strerror})"]
    except ValueError as e:  # not JSON, or HFConfigError
        return [f"model.hf_path={m.hf_path}: {path}: {e}"]
    return []


def schema_problems(cfg) -> list[str]:
    """The schema's own rules (first phase): a Hugging Face model's config, the tokenizer,
    unknown keys, required keys, ranges, unused options."""
    out = hf_config_problems(cfg) or tokenizer_problems(cfg)
    if out:
        return out
    out = _unknown_key_problems(cfg)
    out += [f"{k} is required" for k in ("run_dir",) if OmegaConf.is_missing(cfg, k)]
    out += _range_problems(cfg)
    return out or _unused_option_problems(cfg)


def _moe_problems(cfg, topo: Topology | None) -> list[str]:
    m, p = cfg.model.moe, cfg.parallel
    if m.num_experts == 0:
        return []
    out = []
    if m.top_k > m.num_experts:
        out.append(f"model.moe.top_k={m.top_k} must be between 1 and model.moe.num_experts={m.num_experts}")
    if m.n_group > 1:
        per_group = m.num_experts // m.n_group
        if m.num_experts % m.n_group or per_group < 2:
            out.append(f"model.moe.n_group={m.n_group} must divide model.moe.num_experts={m.num_experts} into groups "
                       "of at least 2 experts (a group's score is the sum of its two best)")
        elif not 1 <= m.topk_group <= m.n_group or m.top_k > m.topk_group * per_group:
            out.append(f"model.moe.topk_group={m.topk_group} must be between 1 and model.moe.n_group={m.n_group}, "
                       f"and its groups must hold model.moe.top_k={m.top_k} experts ({per_group} per group)")
    elif m.topk_group != 1:
        out.append(f"model.moe.topk_group={m.topk_group} only applies with model.moe.n_group > 1")
    if m.first_dense >= cfg.model.n_layers:
        out.append(f"model.moe.first_dense={m.first_dense} leaves no MoE layer of model.n_layers="
                   f"{cfg.model.n_layers}")
    if m.num_experts % p.ep:
        out.append(f"model.moe.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}: each EP rank "
                   f"holds num_experts/ep experts")
    hidden = m.expert_ffn_dim or cfg.model.ffn_dim
    etp = topo.etp if topo is not None else (p.tp if p.etp == -1 else p.etp)
    if hidden % etp:
        out.append(f"the expert hidden size {hidden} (model.moe.expert_ffn_dim) is not divisible by the expert "
                   f"tensor-parallel size etp={etp}")
    if p.tp > 1 and not p.sp:
        out.append(f"MoE with parallel.tp={p.tp} needs parallel.sp=true: the experts see each TP rank's "
                   f"sequence shard of the tokens (as in Megatron-Core)")
    if p.moe_backend == "fssdp" and topo is not None and (topo.etp != 1 or topo.edp != 1):
        stage = topo.tp * topo.cp * topo.dp
        out.append(f"parallel.moe_backend=fssdp shards whole experts over all {stage} ranks of a pipeline stage: "
                   f"set parallel.ep={stage} and parallel.etp=1 (now ep={topo.ep}, etp={topo.etp}, edp={topo.edp})")
    return out


def _tp_problems(m, tp: int) -> list[str]:
    """Attention and matrices must split evenly over the tensor-parallel ranks."""
    if tp == 1:
        return []
    out = []
    if m.n_heads % tp:
        out.append(f"model.n_heads={m.n_heads} is not divisible by parallel.tp={tp}: each TP rank holds "
                   f"n_heads/tp query heads (valid tp: divisors of {m.n_heads})")
    if m.n_kv_heads % tp and tp % m.n_kv_heads and not m.mla.kv_lora_rank:
        out.append(f"model.n_kv_heads={m.n_kv_heads} and parallel.tp={tp}: KV heads are split over TP "
                   f"ranks when tp divides them, or replicated when they divide tp; neither holds")
    if m.ffn_dim % tp:
        out.append(f"model.ffn_dim={m.ffn_dim} (the MLP hidden size) is not divisible by parallel.tp={tp}")
    return out


def _ladder_problems(cfg) -> list[str]:
    m, p = cfg.model, cfg.parallel
    out = []
    if m.ladder_layers > m.n_layers:
        out.append(f"model.ladder_layers={m.ladder_layers} must be between 0 (all layers) and model.n_layers={m.n_layers}")
    if m.residual == "ladder" and m.moe.num_experts and p.tp > 1:
        out.append("model.residual=ladder with MoE blocks and parallel.tp > 1 is not supported: an MoE branch's "
                   "output is not a tensor-parallel partial sum for the ladder runner to reduce")
    if m.residual == "ladder" and p.cp > 1:
        out.append("model.residual=ladder with parallel.cp > 1 is not supported yet")
    if m.residual == "ladder" and m.mtp_depth:
        out.append(f"model.residual=ladder with model.mtp_depth={m.mtp_depth} is not supported: the multi-token "
                   "prediction blocks read the finished residual stream")
    return out


def _model_problems(m) -> list[str]:
    out = []
    if m.head_dim:
        if m.head_dim % 2:
            out.append(f"model.head_dim={m.head_dim} is odd; rotary embeddings need an even head size")
    elif m.dim % m.n_heads:
        out.append(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads} (or set model.head_dim)")
    elif (m.dim // m.n_heads) % 2:
        out.append(f"head size model.dim/model.n_heads = {m.dim}/{m.n_heads} = {m.dim // m.n_heads} "
                   "is odd; rotary embeddings need an even head size")
    r = m.rope_scaling
    if r.type == "llama3" and r.high_freq_factor <= r.low_freq_factor:
        out.append(f"model.rope_scaling.high_freq_factor={r.high_freq_factor} must exceed "
                   f"model.rope_scaling.low_freq_factor={r.low_freq_factor}")
    if m.mla.kv_lora_rank:
        out += _mla_problems(m)
    elif m.n_heads % m.n_kv_heads:
        out.append(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads} "
                   "(grouped-query attention shares each KV head among n_heads/n_kv_heads query heads)")
    return out


def _mla_problems(m) -> list[str]:
    """Multi-head latent attention has one key and value per query head, its own head sizes, and
    none of grouped-query attention's per-head norms or biases."""
    out = []
    if m.n_kv_heads != m.n_heads:
        out.append(f"model.n_kv_heads={m.n_kv_heads} with multi-head latent attention (model.mla.kv_lora_rank="
                   f"{m.mla.kv_lora_rank}): every query head has its own key and value; set model.n_kv_heads="
                   f"{m.n_heads} (= model.n_heads)")
    if m.mla.qk_rope_head_dim % 2:
        out.append(f"model.mla.qk_rope_head_dim={m.mla.qk_rope_head_dim} is odd; rotary embeddings turn pairs")
    extra = [f"model.{k}" for k in ("head_dim", "qk_norm", "qkv_bias") if m.get(k)]
    if extra:
        out.append(f"{', '.join(extra)}: options of grouped-query attention, which multi-head latent attention "
                   "(model.mla.kv_lora_rank > 0) does not have; its head sizes are model.mla.*")
    return out


def _train_problems(cfg, topo: Topology | None) -> list[str]:
    t, out = cfg.train, []
    if topo is None:
        return out
    per_step = t.micro_batch_size * topo.dp
    if t.global_batch_size % per_step:
        out.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size × "
            f"data-parallel size = {t.micro_batch_size} × {topo.dp} = {per_step}; use a multiple of "
            f"{per_step}, e.g. {per_step * max(1, round(t.global_batch_size / per_step))}")
    if t.stop_at_step > t.steps:
        out.append(f"train.stop_at_step={t.stop_at_step} must be between 0 (off) and train.steps={t.steps}")
    p = cfg.parallel
    if p.sp and p.tp == 1:
        out.append("parallel.sp=true needs parallel.tp > 1: sequence parallelism splits the sequence "
                   "over the tensor-parallel ranks")
    elif p.sp and t.seq_len % p.tp:
        out.append(f"train.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp}, which "
                   f"sequence parallelism (parallel.sp=true) splits it over")
    c = cfg.checkpoint
    if not c.enabled:
        saving = [f"{k}={v}" for k, v in (("checkpoint.every", c.every), ("checkpoint.every_s", c.every_s),
                                          ("train.stop_at_step", t.stop_at_step)) if v]
        if saving:
            out.append(f"checkpoint.enabled=false writes no checkpoint, but {', '.join(saving)} asks for one")
    if p.dp_replicate > 1 and p.dp_impl.value != "fsdp":
        out.append(f"parallel.dp_replicate={p.dp_replicate} (HSDP) needs parallel.dp_impl=fsdp, "
                   f"not {p.dp_impl.value}")
    m = cfg.monitor
    if m.enabled and m.hang_timeout_s >= cfg.parallel.timeout_s:
        out.append(f"monitor.hang_timeout_s={m.hang_timeout_s} must be below parallel.timeout_s="
                   f"{cfg.parallel.timeout_s}, or the backend's own timeout fires first")
    return out


def _blend_problems(key: str, blend) -> list[str]:
    """data.blend / data.valid_blend: [[WEIGHT, PATH], ...] with weights ≥ 0 that sum above 0."""
    if blend is None:
        return []
    entries = list(blend) if isinstance(blend, (list, ListConfig)) else None
    pairs = [e for e in entries or [] if isinstance(e, (list, ListConfig)) and len(e) == 2]
    if not entries or len(pairs) != len(entries) or not all(isinstance(p, str) and p for _, p in pairs):
        return [f"data.{key}={OmegaConf.to_container(blend) if isinstance(blend, ListConfig) else blend} must be a "
                "non-empty list of [WEIGHT, PATH] pairs, e.g. data.{key}=[[0.7,web],[0.3,code]]".replace("{key}", key)]
    out = []
    for w, path in pairs:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            out.append(f"data.{key}: the weight {w!r} of {path} must be a finite number ≥ 0")
    if not out and sum(w for w, _ in pairs) <= 0:
        out.append(f"data.{key}: the weights sum to 0; at least one must be positive")
    return out


def _data_problems(cfg) -> list[str]:
    """Which data keys go together (the files themselves are launch/preflight.py's)."""
    d, out = cfg.data, []
    files = d.name in ("tokens", "indexed")
    if files and bool(d.path) == bool(d.blend):
        out.append(f"data={d.name} needs exactly one of data.path=PATH and data.blend=[[WEIGHT,PATH],...] "
                   f"(now path={d.path}, blend={d.blend}); write one with python -m launch.tokenize --out PREFIX FILES...")
    if not files:
        for key in ("path", "blend", "dtype"):
            if d[key] is not None:
                out.append(f"data.{key}={d[key]} only applies with data=tokens or data=indexed (now data={d.name})")
    if d.name == "indexed" and d.dtype is not None:
        out.append(f"data.dtype={d.dtype} does not apply to an indexed dataset: its .idx names the dtype")
    out += _blend_problems("blend", d.blend) + _blend_problems("valid_blend", d.valid_blend)
    own = [k for k in ("valid_path", "valid_blend") if d[k]]
    if len(own) + (d.valid_fraction > 0) > 1:
        given = own + (["valid_fraction"] if d.valid_fraction > 0 else [])
        out.append(f"{' and '.join('data.' + k for k in given)} each choose the validation data; give one")
    if d.name == "synthetic" and (d.document_mask or d.mask_eod_loss):
        out.append("data=synthetic has no documents; data.document_mask and data.mask_eod_loss need a corpus")
    validates = bool(own) or d.valid_fraction > 0
    if cfg.eval.every and not validates:
        out.append(f"eval.every={cfg.eval.every} needs validation data: data.valid_fraction=F (held out from the "
                   "training data), data.valid_path=PATH or data.valid_blend=[[WEIGHT,PATH],...]")
    if validates and not cfg.eval.every:
        out.append("validation data is set (data.valid_fraction, valid_path or valid_blend) but eval.every=0: set "
                   "eval.every=N to evaluate it every N steps, or drop it")
    return out


def _device_problems(cfg) -> list[str]:
    device, dtype = cfg.train.device.value, cfg.train.dtype.value
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    out = []
    if device == "cuda" and not torch.cuda.is_available():
        out.append("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    if cuda and dtype == "float64":
        out.append("train.dtype=float64 is for CPU exactness tests; on CUDA use float32 or bfloat16 "
                   "(or train.device=cpu)")
    mode = cfg.train.compile_mode
    if cfg.train.compile and mode in CUDA_GRAPH_MODES and not cuda:
        out.append(f"train.compile_mode={mode} captures CUDA graphs, which need a CUDA device; on "
                   f"{device} use default or max-autotune-no-cudagraphs")
    return out


def _pipeline_problems(cfg, topo: Topology | None) -> list[str]:
    """The split of layers over stages and the schedule's rules (Narayanan et al.; Megatron-LM)."""
    p, out = cfg.parallel, []
    if p.pp == 1:
        if p.vpp > 1:
            out.append(f"parallel.vpp={p.vpp} needs pipeline parallelism (parallel.pp > 1): virtual stages "
                       f"interleave chunks over pipeline ranks")
        return out
    pp_layers = p.pp_layers
    if pp_layers == "auto":
        if cfg.model.n_layers < p.pp * p.vpp:
            out.append(f"parallel.pp_layers=auto needs at least one layer per stage, but model.n_layers="
                       f"{cfg.model.n_layers} < pp·vpp = {p.pp}·{p.vpp}")
    elif pp_layers is not None and not isinstance(pp_layers, (list, tuple)) and not OmegaConf.is_list(pp_layers):
        return [f"parallel.pp_layers={pp_layers!r} must be a list of {p.pp * p.vpp} layer counts, auto, or null"]
    else:
        try:
            stage_layers(cfg.model.n_layers, p.pp, p.vpp, None if pp_layers is None else list(pp_layers),
                         p.pp_count_embedding_head)
        except PartitionError as e:
            out.append(str(e))
        except (ValueError, TypeError) as e:
            out.append(f"parallel.pp_layers={pp_layers} must be a list of {p.pp * p.vpp} layer counts, auto, or null ({e})")
    if p.schedule == "1f1b" and p.vpp > 1:
        out.append(f"parallel.schedule=1f1b runs one chunk per rank but parallel.vpp={p.vpp}; use "
                   f"parallel.schedule=interleaved_1f1b")
    if p.schedule == "zero_bubble" and p.vpp > 1:
        out.append(f"parallel.schedule=zero_bubble (ZB-H1) runs one chunk per rank but parallel.vpp={p.vpp}")
    if p.schedule == "interleaved_1f1b" and p.vpp == 1:
        out.append("parallel.schedule=interleaved_1f1b needs parallel.vpp > 1 (chunks to interleave)")
    if p.schedule == "zero_bubble" and p.dp_impl.value == "fsdp" and topo is not None and topo.dp * topo.cp > 1:
        out.append("parallel.schedule=zero_bubble defers weight gradients past each block's backward, where "
                   "FSDP2 already reduces them; use parallel.dp_impl=ddp (reduced after the schedule) or dp=1")
    t = cfg.train
    if topo is not None and t.global_batch_size % (t.micro_batch_size * topo.dp) == 0:
        m = t.global_batch_size // (t.micro_batch_size * topo.dp)
        if p.schedule == "interleaved_1f1b":
            group = p.pp_group_size or p.pp
            if m < p.pp:
                out.append(f"the interleaved schedule needs at least pp={p.pp} microbatches per step, but "
                           f"train.global_batch_size / (micro_batch_size × dp) = {t.global_batch_size} / "
                           f"({t.micro_batch_size} × {topo.dp}) = {m}")
            elif not p.pp <= group <= m:
                out.append(f"parallel.pp_group_size={group} must be between pp={p.pp} and the {m} microbatches "
                           f"per step")
            elif m % group and m % group < p.pp:
                out.append(f"{m} microbatches per step in groups of parallel.pp_group_size={group} leave a last "
                           f"group of {m % group} < pp={p.pp}; use a microbatch count that is a multiple of "
                           f"{group} or leaves at least {p.pp}")
    return out


def _context_problems(cfg) -> list[str]:
    p, t, m = cfg.parallel, cfg.train, cfg.model
    if p.cp == 1:
        return []
    out = []
    if t.seq_len % (2 * p.cp):
        out.append(f"train.seq_len={t.seq_len} is not divisible by 2·cp = {2 * p.cp}: context parallelism "
                   f"cuts the sequence into 2·cp chunks (rank i holds chunks i and 2·cp−1−i, balancing "
                   f"causal work); use a multiple of {2 * p.cp}")
    elif p.sp and (t.seq_len // p.cp) % p.tp:
        out.append(f"train.seq_len / cp = {t.seq_len} / {p.cp} = {t.seq_len // p.cp} tokens per CP rank is not "
                   f"divisible by parallel.tp={p.tp}, which sequence parallelism splits them over")
    if m.mtp_depth:
        out.append(f"model.mtp_depth={m.mtp_depth} with parallel.cp={p.cp} is not supported: multi-token "
                   "prediction reads tokens ahead of each position, which context parallelism puts on other ranks")
    heads = m.n_heads // p.tp if m.n_heads % p.tp == 0 else None
    if p.cp_impl == "ulysses" and heads is not None and heads % p.cp:
        out.append(f"parallel.cp_impl=ulysses splits the attention heads over the CP ranks: model.n_heads / tp = "
                   f"{m.n_heads} / {p.tp} = {heads} is not divisible by parallel.cp={p.cp} (use ring)")
    return out


def _cluster_problems(cfg, world_size: int) -> list[str]:
    """The cluster description and placement (Holmes): what every rank can check alone."""
    c, out = cfg.cluster, []
    known = sorted(c.classes)
    unknown = sorted({n.nic for n in c.nodes if n.nic not in c.classes})
    if unknown:
        out.append(f"cluster={c.name} names NIC class(es) {unknown} that cluster.classes does not describe "
                   f"(known: {', '.join(known)})")
    if c.nodes and sum(n.ranks for n in c.nodes) != world_size:
        counts = "+".join(str(n.ranks) for n in c.nodes)
        out.append(f"cluster={c.name} describes {counts} = {sum(n.ranks for n in c.nodes)} processes but the world "
                   f"size is {world_size}; launch that many or use cluster=detect")
    override = os.environ.get("QUINTET_NIC_CLASS")
    if override and override not in c.classes:
        out.append(f"QUINTET_NIC_CLASS={override!r} is not a class of cluster.classes (known: {', '.join(known)})")
    return out


def _layout_problems(cfg, world_size: int) -> tuple[Topology | None, list[str]]:
    problems: list[str] = []
    try:
        topo = Topology.from_config(cfg.parallel, world_size)
    except TopologyError as e:
        topo = None
        problems.append(str(e))
    problems += _cluster_problems(cfg, world_size)
    model = _model_problems(cfg.model)
    problems += model
    if not model:
        problems += _tp_problems(cfg.model, cfg.parallel.tp)
        problems += _moe_problems(cfg, topo)
    return topo, problems


def validate_layout(cfg, world_size: int) -> Topology:
    """The rank layout and the model's fit to it (what `launch.layout` checks)."""
    problems = [p for p in schema_problems(cfg) if not p.startswith("run_dir ")]
    if problems:
        raise ConfigError(problems)
    topo, problems = _layout_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return topo


def validate(cfg, world_size: int) -> Topology:
    """The topology of this run, or ConfigError listing every problem of the first phase that
    finds any. Pure: reads no file (launch/preflight.py checks the files and directories)."""
    problems = schema_problems(cfg)
    if problems:
        raise ConfigError(problems)
    topo, problems = _layout_problems(cfg, world_size)
    problems += _train_problems(cfg, topo)
    if cfg.parallel.moe_backend == "fssdp" and cfg.model.moe.num_experts == 0:
        problems.append("parallel.moe_backend=fssdp needs a model with experts (model=tiny_moe)")
    if cfg.parallel.ep > 1 and cfg.model.moe.num_experts == 0:  # a layout may show EP; training needs experts
        problems.append(f"parallel.ep={cfg.parallel.ep} needs a model with experts (model=tiny_moe, or "
                        f"model.moe.num_experts > 0)")
    problems += _pipeline_problems(cfg, topo)
    problems += _context_problems(cfg)
    problems += _ladder_problems(cfg)
    problems += _device_problems(cfg)
    problems += _data_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return topo
