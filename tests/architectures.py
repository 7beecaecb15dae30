"""Tiny causal LMs of the architectures people use, built from transformers config classes (no download)."""

from __future__ import annotations

from pathlib import Path

from conftest import write_tokenizer

# width 32, 2 layers, 2 heads: each builds and queries in a few seconds on 2 cores
_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)

ARCHITECTURES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64)),
    "pythia": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_COMMON, intermediate_size=64)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, intermediate_size=64, num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, intermediate_size=64, num_key_value_heads=1)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_COMMON, intermediate_size=64)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(_COMMON, ffn_dim=64, word_embed_proj_dim=32)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(_COMMON, intermediate_size=32, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_COMMON, intermediate_size=64, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, shared_expert_intermediate_size=32, decoder_sparse_step=1)),
}


def make_architecture_folder(folder: Path, name: str, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``name`` model with the tests' tokenizer into ``folder``."""
    import torch
    import transformers

    config_class, model_class, options = ARCHITECTURES[name]
    tokenizer = write_tokenizer(folder)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**ids, **options)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    return folder
