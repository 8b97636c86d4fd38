"""Typed configuration of a quintet run.

Every key a user can override is a field here, with a one-line description; every numeric
key carries its valid range (`num(default, ge=..., ...)`). Hydra merges `configs/train.yaml` and
its groups onto these dataclasses, so a wrong type (`parallel.tp=two`), an unknown key or an
unknown enum value fails at composition with a message naming the key. `launch/validate.py`
checks the ranges, the keys Hydra lets in with `+key=value`, and the cross-field rules (sizes
that must divide).

    python -m launch.train --cfg job        # prints the composed config
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: a finite number within the bounds (ge/le inclusive,
    gt/lt exclusive), or one of the sentinels in `also` (e.g. -1 = "the rest")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()
    note: str = ""  # what the sentinels mean, said in the message

    def accepts(self, value) -> bool:
        if value is None or value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        pairs = (("≥", self.ge), (">", self.gt), ("≤", self.le), ("<", self.lt))
        bounds = [f"{sign} {bound:g}" if isinstance(bound, float) else f"{sign} {bound}"
                  for sign, bound in pairs if bound is not None]
        text = " and ".join(bounds) or "a finite number"
        if self.also:
            text += " or " + " or ".join(map(str, self.also))
        return text + (f" ({self.note})" if self.note else "")


def num(default, **bounds):
    """A numeric field: its default and its Range (`launch.validate` refuses values outside it)."""
    return field(default=default, metadata={"range": Range(**bounds)})


class Choice(str, enum.Enum):
    """A closed choice: Hydra refuses any other value at composition, naming the valid ones. A
    member is its string (`==`, hashing, formatting), so code compares with plain strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def choice(name: str, values: str, doc: str) -> type[Choice]:
    """A Choice whose members are `values` (space-separated), names and values alike, so that
    values that are not identifiers ("1f1b", "reduce-overhead") work as Hydra overrides."""
    made = Choice(name, [(v, v) for v in values.split()])
    made.__doc__ = doc
    return made


class DType(Choice):
    """Numeric precision of the training step."""

    float32 = "float32"  # parameters, activations and reductions in fp32 (parity reference)
    bfloat16 = "bfloat16"  # fp32 parameters, bf16 autocast for matmuls
    float64 = "float64"  # everything in double precision (CPU exactness tests)


class DataParallel(Choice):
    """How the data-parallel dimension holds parameters and reduces gradients."""

    fsdp = "fsdp"  # FSDP2 fully_shard: parameters, gradients and optimizer state sharded
    ddp = "ddp"  # torch DistributedDataParallel: replicated, gradients all-reduced


class ActivationCheckpoint(Choice):
    none = "none"  # keep every activation
    full = "full"  # recompute each Transformer block in backward
    selective = "selective"  # recompute only the attention core (scores, softmax)


class Device(Choice):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class CheckpointEngine(Choice):
    lazy = "lazy"  # copied out during the next step's forward/backward, written in the background
    sync = "sync"  # blocking save of every rank's blocks, two-phase commit
    dcp_async = "dcp_async"  # baseline: PyTorch DCP async_save (eager staging copy, background write)


class WandbMode(Choice):
    disabled = "disabled"
    offline = "offline"
    online = "online"


Residual = choice("Residual", "standard ladder", "standard, or ladder (branches overlap the TP all-reduces)")
CPImpl = choice("CPImpl", "ring ulysses", "context-parallel attention")
Schedule = choice("Schedule", "1f1b interleaved_1f1b zero_bubble", "pipeline schedule")
Placement = choice("Placement", "holmes megatron", "logical ranks onto processes")
ReduceDType = choice("ReduceDType", "float32 bfloat16", "FSDP2 gradient reduction precision under bf16")
MoEBackend = choice("MoEBackend", "ep fssdp", "what runs the MoE layers")
CompileMode = choice("CompileMode", "default reduce-overhead max-autotune max-autotune-no-cudagraphs",
                     "torch.compile mode; reduce-overhead and max-autotune capture CUDA graphs")
DataSource = choice("DataSource", "sample tokens indexed synthetic", "where tokens come from")
TokenDType = choice("TokenDType", "uint8 uint16 int16 int32 uint32 int64", "the id type of a headerless token file")
Optimizer = choice("Optimizer", "adamw", "the optimizer")
NcclNet = choice("NcclNet", "IB Socket", "NCCL's network module")


RouterScore = choice("RouterScore", "softmax sigmoid", "how the router scores experts")


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward blocks (num_experts = 0: a dense model)."""

    num_experts: int = num(0, ge=0)  # experts per MoE layer; 0 = no MoE
    top_k: int = num(2, ge=1)  # experts per token
    expert_ffn_dim: int = num(0, ge=0)  # SwiGLU hidden size of each expert; 0 = model.ffn_dim
    every: int = num(1, ge=1)  # layer i is MoE when i % every == 0 and i ≥ first_dense (the others are dense)
    first_dense: int = num(0, ge=0)  # the first layers are dense (DeepSeek's first_k_dense_replace)
    shared_experts: int = num(0, ge=0)  # experts every token goes through: one SwiGLU of shared_experts × expert_ffn_dim
    score: RouterScore = RouterScore["softmax"]  # the router's scores: softmax over experts, or each expert's sigmoid (DeepSeek-V3)
    n_group: int = num(1, ge=1)  # group-limited routing: experts in n_group groups (DeepSeek's node-limited routing)
    topk_group: int = num(1, ge=1)  # ... each token chooses among the topk_group groups of highest top-2 score sum
    routed_scaling_factor: float = num(1.0, gt=0)  # the routed experts' weights are multiplied by this
    renormalize: bool = True  # rescale the top-k routing probabilities to sum to 1
    aux_loss_coef: float = num(0.01, ge=0)  # Switch load-balancing loss
    sequence_aux_loss: bool = False  # compute it per sequence and average (DeepSeek-V3's sequence-wise balance loss)
    z_loss_coef: float = num(0.001, ge=0)  # router z-loss
    bias_update_rate: float = num(0.0, ge=0)  # aux-loss-free balancing: per-expert bias step per update; 0 = off
    capacity_factor: float = num(0.0, ge=0, note="0 = dropless")  # each expert keeps factor·tokens·top_k/experts
    force_balance: bool = False  # route assignment j of token t to expert (t·top_k + j) mod experts, whatever the scores: equal loads, for benchmarks and rehearsals (Megatron's moe_router_force_load_balancing)


RopeType = choice("RopeType", "none llama3 yarn", "rotary frequency scaling")


@dataclass
class RopeScalingConfig:
    """Rotary frequency scaling, as Hugging Face's `rope_scaling` (llama3: Llama 3.1; yarn: YaRN,
    as DeepSeek-V2/V3 use it)."""

    type: RopeType = RopeType["none"]  # none, llama3 or yarn
    factor: float = num(8.0, gt=0)  # how much the longest wavelengths are stretched
    original_max_position_embeddings: int = num(8192, ge=1)  # the context the model was first trained at
    low_freq_factor: float = num(1.0, gt=0)  # llama3: wavelengths above original_max_position_embeddings / this are scaled
    high_freq_factor: float = num(4.0, gt=0)  # llama3: wavelengths below original_max_position_embeddings / this are kept
    beta_fast: float = num(32.0, gt=0)  # yarn: pairs turning more often than this over the original context are kept
    beta_slow: float = num(1.0, gt=0)  # yarn: pairs turning less often than this are interpolated
    mscale: float = num(1.0, ge=0)  # yarn: cos/sin scale mscale(factor, this) / mscale(factor, mscale_all_dim)
    mscale_all_dim: float = num(0.0, ge=0, note="0 = none")  # yarn: MLA's softmax scale × mscale(factor, this)²


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3) in place of grouped-query attention."""

    kv_lora_rank: int = num(0, ge=0, note="0 = grouped-query attention")  # the compressed key/value latent per token
    q_lora_rank: int = num(0, ge=0, note="0 = one full query projection")  # the query's low-rank bottleneck
    qk_nope_head_dim: int = num(128, ge=1)  # per head: query/key dimensions without rotation
    qk_rope_head_dim: int = num(64, ge=2)  # per head: rotated query/key dimensions (the key's shared by all heads)
    v_head_dim: int = num(128, ge=1)  # per head: value dimensions


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention."""

    name: str = MISSING  # the config's name (model=<name>), recorded for reports
    n_layers: int = num(MISSING, ge=1)  # Transformer blocks
    dim: int = num(MISSING, ge=1)  # hidden size
    n_heads: int = num(MISSING, ge=1)  # query heads
    n_kv_heads: int = num(MISSING, ge=1)  # key/value heads (grouped-query attention); divides n_heads
    ffn_dim: int = num(MISSING, ge=1)  # SwiGLU inner size
    vocab_size: int = num(MISSING, ge=1)  # token ids the model knows (the tokenizer's, or more)
    pad_vocab_to_multiple_of: int = num(128, ge=1)  # embedding and head rows: vocab_size rounded up to a multiple of this × parallel.tp (Megatron-Core's padding)
    max_position_embeddings: int = num(II("train.seq_len"), ge=1)  # the longest context the model is meant for (exported to config.json)
    hf_path: Optional[str] = None  # model=hf: a Hugging Face model folder (config.json + safetensors) to start from
    norm_eps: float = num(1e-5, gt=0)  # RMSNorm epsilon
    rope_theta: float = num(10000.0, gt=0)  # rotary embedding base
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    head_dim: int = num(0, ge=0, note="0 = dim / n_heads")  # size of each attention head
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before the rotation (Qwen3)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    tie_embeddings: bool = False  # the output head is the embedding matrix
    residual: Residual = Residual["standard"]  # ladder: each branch's TP all-reduce overlaps the next branch
    ladder_layers: int = num(0, ge=0, note="0 = all")  # with residual=ladder: how many of the last layers are ladder
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp_depth: int = num(0, ge=0)  # multi-token prediction (DeepSeek-V3): extra blocks, each predicting one more token ahead
    mtp_loss_weight: float = num(0.1, ge=0)  # λ: the weight of the MTP blocks' mean loss


@dataclass
class FSSDPConfig:
    """Fully sharded sparse data parallelism for MoE layers (parallel.moe_backend=fssdp)."""

    window: int = num(5, ge=1)  # steps in the sliding average of expert loads
    hot: int = num(2, ge=0)  # experts to replicate per layer (the top by load)
    hot_min_ratio: float = num(1.25, ge=0)  # ... and only those with load above this × the mean expert load
    budget: int = num(2, ge=0)  # materialised experts per device beyond those it owns
    reshard_every: int = num(100, ge=0, note="0 = never")  # re-plan expert ownership every N steps; 0 = never
    rematerialize: bool = False  # free gathered experts after forward, gather again for backward
    calibrate: bool = False  # plan replicas from each microbatch's actual routing (no gather overlap)


@dataclass
class ParallelConfig:
    """Sizes of the parallel dimensions; their product is the world size."""

    tp: int = num(1, ge=1)  # tensor-parallel size
    pp: int = num(1, ge=1)  # pipeline-parallel size
    cp: int = num(1, ge=1)  # context-parallel size
    dp: int = num(-1, ge=1, also=(-1,), note="-1 = world size / (tp·pp·cp)")  # data-parallel size
    ep: int = num(1, ge=1)  # expert-parallel size (MoE layers)
    etp: int = num(-1, ge=1, also=(-1,), note="-1 = tp")  # expert tensor-parallel size (-1: Megatron-Core's default)
    order: str = "tp-cp-ep-dp-pp"  # rank layout, fastest-varying dimension first
    sp: bool = False  # sequence parallelism: norms and residual stream on sequence shards (needs tp > 1)
    cp_impl: CPImpl = CPImpl["ring"]  # context-parallel attention: KV ring or head all-to-all
    vpp: int = num(1, ge=1)  # model chunks per pipeline rank (1 = no interleaving)
    schedule: Schedule = Schedule["1f1b"]  # pipeline schedule (interleaving needs vpp > 1)
    pp_group_size: int = num(0, ge=0, note="0 = pp")  # interleaved schedule: microbatches per group; 0 = pp
    pp_layers: Any = None  # layers per stage: a list of pp·vpp counts; null = even; auto = by stage speed
    placement: Placement = Placement["holmes"]  # logical ranks -> processes: by NIC class and node, or the identity
    pp_count_embedding_head: bool = False  # balance stages counting the embedding and head as a layer each
    dp_impl: DataParallel = DataParallel.fsdp  # how data parallelism shards and reduces
    dp_replicate: int = num(1, ge=1)  # HSDP: replicas of an FSDP group sharded over dp·cp/dp_replicate ranks
    reshard_after_forward: bool = True  # false = ZeRO-2-like: keep gathered parameters until backward
    reduce_dtype: ReduceDType = ReduceDType["float32"]  # FSDP2 gradient reduction precision under train.dtype=bfloat16
    activation_checkpoint: ActivationCheckpoint = ActivationCheckpoint.none  # recompute blocks or attention cores
    moe_backend: MoEBackend = MoEBackend["ep"]  # MoE layers: expert parallelism, or FSSDP (Hecate)
    fssdp: FSSDPConfig = field(default_factory=FSSDPConfig)
    timeout_s: float = num(600.0, ge=10)  # timeout of every process group (a hang fails, never waits forever)


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = num(200, ge=1)  # optimizer steps of the whole run (the schedule's length)
    stop_at_step: int = num(0, ge=0, note="0 = off")  # end this launch after this step, with a checkpoint
    global_batch_size: int = num(16, ge=1)  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = num(4, ge=1)  # sequences per microbatch per data-parallel rank
    seq_len: int = num(256, ge=1)  # tokens per sequence
    lr: float = num(3e-3, gt=0)  # peak learning rate
    dtype: DType = DType.float32  # precision of the step
    device: Device = Device.auto  # where the model runs
    skip_nonfinite: int = num(3, ge=0, note="0 = stop at the first")  # NaN/Inf steps in a row to skip; one more stops
    compile: bool = False  # torch.compile each Transformer block (after activation checkpointing, before FSDP)
    compile_mode: CompileMode = CompileMode["default"]  # reduce-overhead and max-autotune capture CUDA graphs


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, and global-norm gradient clipping."""

    name: Optimizer = Optimizer["adamw"]  # the optimizer
    beta1: float = num(0.9, ge=0, lt=1)  # AdamW's first-moment decay
    beta2: float = num(0.95, ge=0, lt=1)  # AdamW's second-moment decay
    eps: float = num(1e-8, gt=0)  # AdamW's denominator term
    weight_decay: float = num(0.1, ge=0)  # applied to matrices and embeddings, not to norm weights
    warmup_steps: int = num(20, ge=0)  # linear warm-up from lr/warmup_steps to lr
    min_lr_ratio: float = num(0.1, ge=0, le=1)  # cosine decays to lr·min_lr_ratio at train.steps
    grad_clip: float = num(1.0, ge=0, note="0 = no clipping")  # max global gradient norm; 0 disables clipping
    fused: Optional[bool] = None  # fused AdamW kernel; null = on CUDA, the foreach kernel on CPU


@dataclass
class DataConfig:
    """Where tokens come from (docs/data.md)."""

    name: DataSource = MISSING  # set by the data group (data=sample)
    tokenizer: str = "sample"  # bytes | sample (the BPE shipped, trained on the sample corpus) | a tokenizer.json, SentencePiece .model, tiktoken file, or a folder holding one
    path: Optional[str] = None  # tokens/indexed: an indexed dataset's PREFIX (PREFIX.bin + .idx), a .npy file, or a raw token file (with data.dtype)
    blend: Optional[List[Any]] = None  # instead of path: [[WEIGHT, PATH], ...], each the share of sequences drawn from PATH
    dtype: Optional[TokenDType] = None  # the id type of a headerless token file (nanoGPT's train.bin: uint16)
    document_mask: bool = False  # attention never crosses an end-of-document token; positions restart at each document
    mask_eod_loss: bool = False  # no loss on end-of-document targets
    valid_fraction: float = num(0.0, ge=0, lt=1)  # hold out this share of each corpus's documents (its end) for validation
    valid_path: Optional[str] = None  # validation data of its own (a path as data.path), instead of valid_fraction
    valid_blend: Optional[List[Any]] = None  # validation data of its own, as data.blend


@dataclass
class EvalConfig:
    """Validation loss on held-out data (data.valid_fraction, data.valid_path or data.valid_blend)."""

    every: int = num(0, ge=0, note="0 = never")  # evaluate every N optimizer steps and after the last
    batches: int = num(1, ge=1)  # global batches (train.global_batch_size sequences each) per evaluation


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: this run writes no checkpoint, not even on SIGTERM/SIGINT (it still resumes)
    dir: str = "${run_dir}/checkpoints"  # where checkpoints and the `latest` marker live
    every: int = num(0, ge=0, note="0 = no periodic checkpoints")  # save every N optimizer steps and after the last
    every_s: float = num(0.0, ge=0, note="0 = off")  # also save when this many seconds passed since the last
    keep_last: int = num(0, ge=0, note="0 = keep every checkpoint")  # keep only the newest N committed checkpoints
    engine: CheckpointEngine = CheckpointEngine.lazy  # how state is written
    pool_mb: int = num(256, ge=1, note="MiB")  # lazy: host buffer pool per rank, resident from the start
    chunk_mb: int = num(64, ge=1, note="MiB")  # lazy: bytes per coalesced copy/write region
    resume: bool = True  # resume from `<dir>/latest` when it exists
    fallback: bool = True  # when the newest checkpoint does not verify, resume from the newest one that does


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled  # offline needs no network (wandb sync later)
    project: str = "quintet"  # the W&B project
    entity: Optional[str] = None  # the W&B entity (team); null = your default
    name: Optional[str] = None  # run name; default: the run directory's name


@dataclass
class MonitorConfig:
    """Collective timing and diagnosis (after C4): hangs and slow ranks (parallel/monitor.py)."""

    enabled: bool = True  # time every collective of the training thread (2+ ranks)
    hang_timeout_s: float = num(300.0, ge=1)  # a collective unfinished this long is a hang: report, exit 3
    window: int = num(10, ge=0, note="0 = no verdicts")  # steps per slow-rank verdict, after the launch's first step
    slow_fraction: float = num(0.2, gt=0, lt=1)  # slow: the others wait for a rank > this fraction of the window


@dataclass
class LoggingConfig:
    every: int = num(10, ge=1)  # progress line every N steps when stdout is not a terminal
    peak_tflops: Optional[float] = num(None, gt=0, note="TFLOP/s per device")  # MFU's peak; null: datasheet or probe
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class NicClassConfig:
    """One kind of network interface card: what groups inside the class use, and how fast it is."""

    gbps: float = num(10.0, gt=0)  # bandwidth of one node's link in this class, Gbit/s (partition and planner)
    speed_rank: int = num(0, ge=0)  # placement order: lower = faster class, placed on earlier pipeline stages
    nccl_net: NcclNet = NcclNet["Socket"]  # NCCL network module for groups inside the class
    nccl_env: dict[str, str] = field(default_factory=dict)  # e.g. NCCL_IB_HCA, NCCL_IB_GID_INDEX
    gloo_ifname: Optional[str] = None  # interface for gloo groups inside the class; null = the default


@dataclass
class NodeConfig:
    nic: str = "ethernet"  # NIC class (a key of cluster.classes)
    ranks: int = num(1, ge=1)  # processes (GPUs) on the node
    tflops: Optional[float] = num(None, gt=0)  # device throughput per rank; null = measured when needed


def _default_classes() -> dict[str, NicClassConfig]:
    return {
        "ib": NicClassConfig(gbps=200.0, speed_rank=0, nccl_net="IB"),
        "roce": NicClassConfig(gbps=100.0, speed_rank=1, nccl_net="IB", nccl_env={"NCCL_IB_GID_INDEX": "3"}),
        "ethernet": NicClassConfig(gbps=25.0, speed_rank=2, nccl_net="Socket"),
    }


@dataclass
class ClusterConfig:
    """The machines a run is placed on (Holmes): nodes in node-rank order with their NIC class.
    No nodes: each rank detects its node's class at launch (QUINTET_NIC_CLASS overrides)."""

    name: str = "detect"  # the description's name (cluster=<name>); detect = none
    nodes: list[NodeConfig] = field(default_factory=list)  # the nodes in node-rank order; [] = detect at launch
    classes: dict[str, NicClassConfig] = field(default_factory=_default_classes)  # NIC classes by name
    cross_gbps: Optional[float] = num(None, gt=0)  # between classes (sockets); null = the slower class's gbps


@dataclass
class QuintetConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: int = num(0, ge=0, lt=2**63)  # initialisation and data order
    trace: bool = False  # per-rank timeline of forward/backward/communication in <run_dir>/trace/
    run_dir: str = MISSING  # one directory shared by all ranks of a job


def register() -> None:
    """Make the schema available to `configs/train.yaml` as `quintet_schema`."""
    ConfigStore.instance().store(name="quintet_schema", node=QuintetConfig)
