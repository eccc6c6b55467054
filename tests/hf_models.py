"""Tiny random Hugging Face models built from configs (no downloads), for parity tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            initializer_range=0.1, rms_norm_eps=1e-5)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

FAMILIES = {
    "llama-mha": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama-gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"num_key_value_heads": 2}),
    "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                    {"num_key_value_heads": 2, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                {"num_key_value_heads": 1, "sliding_window": 7, "head_dim": 16}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              {"num_key_value_heads": 2, "tie_word_embeddings": True}),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random fp32 model of one family, in eval mode."""
    config_cls, model_cls, extra = FAMILIES[family]
    kw = {**TINY, **extra, **overrides}
    if family == "mistral":
        kw["attn_implementation"] = "eager"
    config = config_cls(**kw)
    torch.manual_seed(seed)
    model = model_cls(config).eval().to(torch.float32)
    with torch.no_grad():  # norms at 1.0 hide bugs in where they are applied: randomise them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, folder) -> str:
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """transformers' own forward: [T] or [B, T] tokens -> float32 logits."""
    t = torch.as_tensor(np.atleast_2d(tokens), dtype=torch.long)
    with torch.no_grad():
        return model(t).logits.float().numpy()
