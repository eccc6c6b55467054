"""Tiny random Hugging Face models built from configs (no downloads), for parity tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers

transformers.utils.logging.disable_progress_bar()

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
    # q/k norms, head_dim from the config (24, not 64 / 4), tied embeddings as Qwen3-0.6B
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              {"num_key_value_heads": 2, "head_dim": 24, "rope_theta": 1e6, "tie_word_embeddings": True}),
    # Qwen3's long-context recipe: YaRN (static: blended frequencies, cos and sin scaled)
    "qwen3-yarn": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                   {"num_key_value_heads": 1, "head_dim": 32, "rope_scaling": {
                       "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                       "rope_theta": 10000.0}}),
    # fused qkv_proj and gate_up_proj in the checkpoint, a sliding window
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             {"num_key_value_heads": 2, "sliding_window": 7, "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2}),
    # Phi-4-mini's RoPE: LongRoPE (short factors below its original context, then long ones;
    # cos and sin scaled) on the first 3/4 of each head. The tests stay inside the original
    # context, except tests/test_families.py's test of the switch
    "phi3-longrope": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
                      {"num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                       "original_max_position_embeddings": 64, "partial_rotary_factor": 0.75,
                       "rope_scaling": {"rope_type": "longrope", "partial_rotary_factor": 0.75,
                                        "short_factor": [1.0, 1.3, 1.9, 2.6, 3.2, 4.1],
                                        "long_factor": [1.5, 2.7, 4.4, 9.1, 17.0, 31.0]}}),
    # routed experts: softmax, top 2 of 8, not renormalised (Qwen3-MoE) / renormalised (Mixtral)
    "qwen3-moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  {"num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 32, "norm_topk_prob": False}),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                {"num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
                 "intermediate_size": 48}),
    # sliding layers (window 5) and global ones (every 3rd: pattern 3), two RoPE bases, the
    # global one scaled (linear), query_pre_attn_scalar != head_dim, a final softcap, tied
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               {"num_hidden_layers": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 5,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 100000.0}},
                "query_pre_attn_scalar": 24, "final_logit_softcapping": 3.0, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 512}),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random fp32 model of one family, in eval mode."""
    config_cls, model_cls, extra = FAMILIES[family]
    kw = {**TINY, **extra, **overrides}
    if family not in ("llama-mha", "llama-gqa", "llama3-rope", "qwen2"):
        kw["attn_implementation"] = "eager"  # the sliding-window masks, exact softmax
    config = config_cls(**kw)
    torch.manual_seed(seed)
    model = model_cls(config).eval().to(torch.float32)
    with torch.no_grad():  # norms at 1.0 hide bugs in where they are applied: randomise them
        for name, p in model.named_parameters():
            if "norm" in name:  # (gemma3 scales by 1 + w: around 1 too)
                p.copy_((0.0 if family == "gemma3" else 1.0) + 0.2 * torch.randn_like(p))
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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CORPUS = ("The quick brown fox jumps over the lazy dog. A bounded state forgets; an unbounded "
           "one remembers everything. Paris is the capital of France. 0123456789 \"quotes\"\n") * 20


def make_tokenizer(vocab_size: int = 320):
    """A small byte-level BPE tokenizer trained on the spot, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def save_tiny_model(folder, family: str = "llama-gqa", seed: int = 0, **overrides) -> str:
    """A tiny random model with a working tokenizer (vocab 320), saved as a HF folder."""
    tok = make_tokenizer()
    model = make_hf_model(family, seed=seed, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, **overrides)
    save_hf_model(model, folder)
    tok.save_pretrained(folder)
    return str(folder)
