"""Small random models of the Hugging Face architectures quintet imports, made and saved by
transformers itself, for the tests of import and export."""
import shutil

import torch

from runtime.data.tokenizer import SAMPLE_TOKENIZER

SIZES = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
# One configuration per architecture, each with what sets it apart.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 16}, rope_theta=500000.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),  # q/k/v biases, tied head
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),  # QK-norm, heads wider than dim / n_heads
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",  # experts in layer 0, a dense MLP in layer 1
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                       mlp_only_layers=[1], decoder_sparse_step=1)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    # DeepSeek-V3: a low-rank query, YaRN (cos/sin and softmax mscales both ≠ 1), layer 0 dense,
    # layer 1 with node-limited routing over 4 groups, a shared expert, scaled weights.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=12,
                         qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=32, n_shared_experts=1, n_group=4, topk_group=2,
                         first_k_dense_replace=1, routed_scaling_factor=2.5,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                          "mscale": 0.707, "mscale_all_dim": 1.0})),
    # ... and as DeepSeek-V2-Lite's attention: one full query projection, no rotary scaling.
    "deepseek_v3_full_query": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                               dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=12,
                                    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, n_shared_experts=2, n_group=1, topk_group=1,
                                    first_k_dense_replace=0, routed_scaling_factor=1.0)),
}


def save_random(arch: str, folder, seed: int = 0, tokenizer: bool = True, **changes):
    """A random transformers model of `arch`, saved with save_pretrained (and the sample tokenizer)."""
    import transformers

    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**SIZES, **extra, **changes})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
        for name, b in model.named_buffers():  # DeepSeek-V3's routing bias, which changes the choice
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    if tokenizer:
        shutil.copyfile(SAMPLE_TOKENIZER, folder / "tokenizer.json")
    return folder


