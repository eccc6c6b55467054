"""Model configuration: one frozen, hashable dataclass that `jit` treats as static.

`ModelConfig.from_hf_config` reads a Hugging Face `config.json` dictionary (the old
`rope_theta`/`rope_scaling` layout and the newer `rope_parameters` layout alike) and
raises `UnsupportedConfigError` naming any field that would change the math and that
this implementation does not handle — better a loud error than a quietly wrong model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from .errors import UnsupportedConfigError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "qwen3_moe", "mixtral", "gemma3_text")
MOE_FAMILIES = ("qwen3_moe", "mixtral")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a llama-like decoder. Hashable: safe as a static jit arg."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    # or ("linear", factor) or ("longrope", short_factor, long_factor,
    # original_max_position_embeddings, attention_factor) or ("yarn", factor,
    # original_max_position_embeddings, beta_fast, beta_slow, truncate, attention_factor) or None.
    rope_scaling: tuple | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None  # mistral, phi3: attend only to positions > p - W
    qk_norm: bool = False  # qwen3: an RMS norm over each head's q and k before RoPE
    rotary_dim: int | None = None  # phi-4-mini: RoPE on the first rotary_dim dims only
    # mixture of experts (qwen3_moe, mixtral): num_experts routed MLPs of moe_intermediate_size,
    # experts_per_token chosen per token; their softmax weights renormalised over the chosen
    # ones if norm_topk_prob. Every layer is routed.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # gemma3_text: its norms (1 + w), sandwich norms, embedding times sqrt(hidden), GELU-tanh
    # follow from the family; these are its numbers. sliding_layers: which layers attend
    # over `sliding_window` only (empty: every layer alike, e.g. Mistral's window on all);
    # those layers use RoPE base rope_local_theta without scaling, the others rope_theta
    # with rope_scaling. Scores are scaled 1/sqrt(query_pre_attn_scalar) (None: head_dim);
    # final_logit_softcapping: logits = cap tanh(logits / cap).
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedConfigError(
                f"unknown model type {self.family!r} (supported: {', '.join(FAMILIES)})")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2 or self.rotary % 2 or not 0 < self.rotary <= self.head_dim:
            raise UnsupportedConfigError(f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}: "
                                         "RoPE needs an even number of rotated dims, at most head_dim")
        if self.sliding_layers and not (self.sliding_window and self.sliding_window >= 1
                                        and all(0 <= l < self.num_layers for l in self.sliding_layers)):
            raise UnsupportedConfigError(f"sliding layers {list(self.sliding_layers)} need a sliding_window >= 1 "
                                         f"and layer indices below {self.num_layers}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise UnsupportedConfigError(f"num_experts_per_tok={self.experts_per_token} with "
                                         f"{self.num_experts} experts")

    @property
    def gemma(self) -> bool:
        """Gemma 3's layer: norms (1 + w), sandwich norms, the scaled embedding, GELU-tanh."""
        return self.family == "gemma3_text"

    @property
    def grouped(self) -> bool:
        """Whether the layers differ in how far they attend: the state is then `Groups`
        (docs/design.md §12), one fixed-shape state per `layer_groups` entry."""
        return bool(self.sliding_layers)

    @property
    def layer_groups(self) -> tuple[tuple[tuple[int, ...], int | None], ...]:
        """((layers, window or None), ...): the layers of each group in order. A window
        group keeps exactly its window (policy window); the None group (the global layers)
        is bounded by the user's policy and capacity. One group of every layer when the
        layers do not differ."""
        L = self.num_layers
        if not self.grouped:
            return ((tuple(range(L)), None),)
        local = tuple(sorted(self.sliding_layers))
        glob = tuple(l for l in range(L) if l not in self.sliding_layers)
        return tuple(g for g in ((local, self.sliding_window), (glob, None)) if g[0])

    @property
    def layer_slots(self) -> tuple[tuple[int, int], ...]:
        """For each layer, (its group, its index within the group's state)."""
        where = {}
        for g, (layers, _) in enumerate(self.layer_groups):
            for i, l in enumerate(layers):
                where[l] = (g, i)
        return tuple(where[l] for l in range(self.num_layers))

    def group_config(self, g: int) -> "ModelConfig":
        """The config that the layers of group g compute with: one kind of layer (its
        window, its RoPE), no groups. Every layer-level function takes it unchanged."""
        if not self.grouped:
            return self
        _, window = self.layer_groups[g]
        if window is not None:
            return dataclasses.replace(self, sliding_layers=(), sliding_window=window,
                                       rope_theta=self.rope_local_theta or self.rope_theta, rope_scaling=None)
        return dataclasses.replace(self, sliding_layers=(), sliding_window=None)

    @property
    def rotary(self) -> int:
        """How many dims of each head RoPE rotates (the rest pass through)."""
        return self.rotary_dim or self.head_dim

    @property
    def moe(self) -> bool:
        """Whether the MLPs are routed experts (`core.layers.moe`)."""
        return self.num_experts > 0

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def inv_freq(self, long: bool = False) -> np.ndarray:
        """RoPE inverse frequencies [R/2] (R = `rotary`), float32, with the configured
        scaling. LongRoPE has two sets: `long` for positions >= its original context."""
        d = self.rotary
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
        inv = inv.astype(np.float32)
        if self.rope_scaling is None:
            return inv
        kind = self.rope_scaling[0]
        if kind == "yarn":  # transformers' _compute_yarn_parameters
            _, factor, old_ctx, beta_fast, beta_slow, truncate, _ = self.rope_scaling

            def dim_of(rotations):
                return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(self.rope_theta))

            low, high = dim_of(beta_fast), dim_of(beta_slow)
            if truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, d - 1)
            high = high + 0.001 if low == high else high
            ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
            extrapolate = (1 - ramp).astype(np.float32)
            return (inv / np.float32(factor) * (1 - extrapolate) + inv * extrapolate).astype(np.float32)
        if kind == "longrope":
            ext = np.asarray(self.rope_scaling[2 if long else 1], np.float32)
            shape = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d
            return (1.0 / (ext * np.float32(self.rope_theta) ** shape)).astype(np.float32)
        if kind == "linear":
            return (inv / np.float32(self.rope_scaling[1])).astype(np.float32)
        if kind == "llama3":
            _, factor, low, high, old_ctx = self.rope_scaling
            low_wl, high_wl = old_ctx / low, old_ctx / high
            wavelen = 2 * math.pi / inv
            out = np.where(wavelen > low_wl, inv / factor, inv)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * out / factor + smooth * out
            medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
            return np.where(medium, smoothed, out).astype(np.float32)
        raise UnsupportedConfigError(f"rope scaling {kind!r}")  # pragma: no cover (checked on load)

    @property
    def rope_attention_factor(self) -> float:
        """What every cos and sin of RoPE is multiplied by (LongRoPE, YaRN; else 1)."""
        if self.rope_scaling is not None and self.rope_scaling[0] in ("longrope", "yarn"):
            return float(self.rope_scaling[-1])
        return 1.0

    @property
    def long_rope(self) -> tuple[int, float] | None:
        """LongRoPE's (switch, attention factor): a position p >= switch is rotated with the
        long factors (as transformers' step-by-step decoding does), every cos and sin is
        multiplied by the factor. None without LongRoPE."""
        if self.rope_scaling is None or self.rope_scaling[0] != "longrope":
            return None
        return int(self.rope_scaling[3]), float(self.rope_scaling[4])

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = ([list(x) if isinstance(x, tuple) else x for x in self.rope_scaling]
                             if self.rope_scaling else None)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["sliding_layers"] = list(self.sliding_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(tuple(x) if isinstance(x, list) else x for x in d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        d["sliding_layers"] = tuple(d.get("sliding_layers") or ())

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UnsupportedConfigError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config dict; raise on any unhandled math."""
        return _from_hf(hf)


# Fields of HF configs that never change the forward math of these families.
_IGNORED = {
    "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
    "torch_dtype", "transformers_version", "use_cache", "initializer_range", "model_type",
    "attention_dropout", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "_name_or_path", "pretraining_tp", "tie_word_embeddings", "tokenizer_class", "name_or_path",
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "bias",
    "is_llama_config", "rope_interleaved", "use_return_dict", "torchscript",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
    "tf_legacy_loss", "pruned_heads", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "is_decoder", "typical_p", "temperature", "top_k", "top_p",
    "max_length", "min_length", "do_sample", "num_beams", "repetition_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "num_beam_groups", "diversity_penalty", "length_penalty",
    "early_stopping", "encoder_no_repeat_ngram_size", "torch_compile", "_attn_implementation",
    "_attn_implementation_autoset", "keys_to_ignore_at_inference", "base_model_tp_plan",
    "base_model_pp_plan", "unsloth_fixed", "unsloth_version", "quantization_config",
    "embedding_multiplier", "logits_scaling", "attention_multiplier", "residual_multiplier",
    "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar",
    "partial_rotary_factor", "qk_layernorm", "use_qk_norm",
    "unk_token_id", "transformers.js_config",
    # phi3: dropout; the original context of LongRoPE (read in `_rope`); Phi-4-mini's remote
    # code's switches, checked neutral below (transformers' Phi3 ignores them)
    "resid_pdrop", "embd_pdrop", "original_max_position_embeddings", "full_attn_mod",
    "interpolate_factor", "lm_head_bias",
    # mixture of experts: read below; the router's training-only switches
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
    "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise",
}


def _rope(hf: dict[str, Any], head_dim: int) -> tuple[float, tuple | None, int | None]:
    """(theta, scaling, rotary_dim or None) of a HF config."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else scaling
    else:
        theta = float(hf.get("rope_theta", 10000.0))
    partial = float(hf.get("partial_rotary_factor") or 1.0)
    for d in (params, scaling):
        if isinstance(d, dict) and d.get("partial_rotary_factor") not in (None, 1, 1.0):
            partial = float(d["partial_rotary_factor"])
    rotary = None
    if partial != 1.0:
        if hf.get("model_type") != "phi3":
            raise UnsupportedConfigError(f"unsupported config field partial_rotary_factor={partial}")
        rotary = int(head_dim * partial)
    if not scaling:
        return theta, None, rotary
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None, rotary
    if kind == "linear":
        return theta, ("linear", float(scaling["factor"])), rotary
    if kind == "llama3":
        return theta, ("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                       float(scaling["high_freq_factor"]),
                       int(scaling["original_max_position_embeddings"])), rotary
    if kind == "yarn" and hf.get("model_type") in ("qwen3", "qwen3_moe"):  # Qwen3's long-context recipe
        old = int(scaling["original_max_position_embeddings"])
        factor = float(scaling.get("factor") or hf["max_position_embeddings"] / old)
        att = scaling.get("attention_factor")
        if att is None:
            def mscale(scale, m=1.0):
                return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            att = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        return theta, ("yarn", factor, old, float(scaling.get("beta_fast") or 32),
                       float(scaling.get("beta_slow") or 1), bool(scaling.get("truncate", True)),
                       float(att)), rotary
    if kind in ("longrope", "su") or (kind == "yarn" and hf.get("model_type") == "phi3"):
        # transformers' _compute_longrope_parameters (phi3 reads "su" and "yarn" as longrope)
        old = int(scaling.get("original_max_position_embeddings")
                  or hf.get("original_max_position_embeddings") or hf["max_position_embeddings"])
        factor = scaling.get("factor") or hf["max_position_embeddings"] / old
        att = scaling.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        short, long = (tuple(float(f) for f in scaling[k]) for k in ("short_factor", "long_factor"))
        n = (rotary or head_dim) // 2
        if len(short) != n or len(long) != n:
            raise UnsupportedConfigError(f"longrope short_factor/long_factor need {n} values each")
        return theta, ("longrope", short, long, old, float(att)), rotary
    raise UnsupportedConfigError(f"unsupported config field rope_scaling type {kind!r}")


def _experts(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a qwen3_moe or mixtral config."""
    if family not in MOE_FAMILIES:
        for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if hf.get(key):
                raise UnsupportedConfigError(f"unsupported config field {key}={hf[key]!r} "
                                             f"(a {family} model has no experts)")
        return {}
    n = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    layers = int(hf["num_hidden_layers"])
    if family == "mixtral":  # every layer routed, the chosen weights always renormalised
        return dict(num_experts=n, experts_per_token=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True)
    step = int(hf.get("decoder_sparse_step") or 1)
    only = {int(i) for i in hf.get("mlp_only_layers") or ()}
    # transformers' Qwen3MoeDecoderLayer: experts where not mlp_only and (i + 1) % step == 0
    dense = tuple(i for i in range(layers) if i in only or not (n > 0 and (i + 1) % step == 0))
    if dense:  # the stacked layers share one layout: all routed (Qwen3-30B-A3B, -235B-A22B)
        raise UnsupportedConfigError(
            f"unsupported config field mlp_only_layers/decoder_sparse_step: dense MLP layers {list(dense)} "
            "between routed ones")
    return dict(num_experts=n, experts_per_token=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)))


# Gemma3TextConfig's defaults: a `gemma3` (multimodal) config.json lists only the text
# fields that differ from them in its text_config
GEMMA3_TEXT_DEFAULTS = dict(
    model_type="gemma3_text", vocab_size=262208, hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
    sliding_window=4096, sliding_window_pattern=6, final_logit_softcapping=None,
    attn_logit_softcapping=None, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1)
_GEMMA3_KEYS = {"hidden_activation", "rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern",
                "cache_implementation", "use_bidirectional_attention", "text_config"}


def _hf_shape(hf: dict[str, Any]) -> dict[str, Any]:
    """The fields every family reads alike from a Hugging Face config: sizes, heads, the
    norm's epsilon, the special tokens."""
    heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id")
    return dict(vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]), num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                                    if e is not None))


def _gemma3(hf: dict[str, Any]) -> ModelConfig:
    """A gemma3_text config (or the text part of a gemma3 one): sliding layers by
    `layer_types` or every `sliding_window_pattern`-th layer global, two RoPE bases."""
    if hf.get("model_type") == "gemma3":
        text = hf.get("text_config") or {}
        hf = {**GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k.endswith("softcapping")},
              "model_type": "gemma3_text"}
        for key in ("bos_token_id", "eos_token_id"):
            hf[key] = text.get(key, GEMMA3_TEXT_DEFAULTS[key])
    unknown = sorted(k for k in hf if k not in _IGNORED and k not in _GEMMA3_KEYS)
    if unknown:
        raise UnsupportedConfigError(f"unsupported config field {unknown[0]!r}"
                                     + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedConfigError(f"unsupported config field hidden_activation={act!r}")
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention", "quantization_config"):
        if hf.get(key):
            raise UnsupportedConfigError(f"unsupported config field {key}={hf[key]!r}")
    if hf.get("attn_logit_softcapping") is not None:
        raise UnsupportedConfigError(f"unsupported config field attn_logit_softcapping={hf['attn_logit_softcapping']!r}")
    L = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")
    if types is None:
        pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    if len(types) != L or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise UnsupportedConfigError(f"unsupported config field layer_types={sorted(set(types))} "
                                     f"({len(types)} for {L} layers)")
    shape = _hf_shape(hf)
    head_dim = shape["head_dim"]
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and set(params) & {"full_attention", "sliding_attention"}:
        glob, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise UnsupportedConfigError(f"unsupported config field rope_parameters.sliding_attention "
                                         f"rope_type {local.get('rope_type')!r}")
        local_theta = float(local.get("rope_theta", 10_000.0))
        theta, scaling, _ = _rope({"model_type": "gemma3_text", "rope_parameters": glob,
                                   "max_position_embeddings": hf.get("max_position_embeddings")}, head_dim)
    else:
        local_theta = float(hf.get("rope_local_base_freq", 10_000.0))
        theta, scaling, _ = _rope({k: v for k, v in hf.items() if k != "partial_rotary_factor"}, head_dim)
    if scaling is not None and scaling[0] != "linear":
        raise UnsupportedConfigError(f"unsupported config field rope_scaling type {scaling[0]!r} (gemma3: linear)")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    window = hf.get("sliding_window")
    if sliding and not window:
        raise UnsupportedConfigError("sliding_attention layers without a sliding_window")
    softcap = hf.get("final_logit_softcapping")
    qpas = hf.get("query_pre_attn_scalar")
    return ModelConfig(
        family="gemma3_text",
        **shape,
        num_layers=L,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=int(window) if sliding else None,
        qk_norm=True,
        max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
        sliding_layers=sliding,
        rope_local_theta=local_theta,
        query_pre_attn_scalar=float(qpas) if qpas is not None else None,
        final_logit_softcapping=float(softcap) if softcap is not None else None,
    )


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    family = hf.get("model_type")
    if family in ("gemma3", "gemma3_text"):
        return _gemma3(hf)
    if family not in FAMILIES:
        raise UnsupportedConfigError(
            f"unknown model type {family!r} (supported: {', '.join(FAMILIES)})")
    unknown = sorted(k for k in hf if k not in _IGNORED)
    if unknown:
        raise UnsupportedConfigError(f"unsupported config field {unknown[0]!r}"
                                     + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"unsupported config field hidden_act={hf['hidden_act']!r}")
    if hf.get("mlp_bias"):
        raise UnsupportedConfigError("unsupported config field mlp_bias=true")
    if family != "qwen2" and hf.get("attention_bias"):
        raise UnsupportedConfigError("unsupported config field attention_bias=true")
    if hf.get("quantization_config"):
        raise UnsupportedConfigError("unsupported config field quantization_config")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types) and family != "mistral":
        raise UnsupportedConfigError(f"unsupported config field layer_types={sorted(set(layer_types))}")
    sliding = None
    if family in ("mistral", "phi3", "mixtral"):  # every layer windowed when set
        sliding = hf.get("sliding_window")
    elif hf.get("use_sliding_window"):
        raise UnsupportedConfigError("unsupported config field use_sliding_window=true")
    for key in ("embedding_multiplier", "logits_scaling", "attention_multiplier", "residual_multiplier",
                "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar",
                "qk_layernorm", "use_qk_norm"):
        if hf.get(key) not in (None, False, 1, 1.0):
            raise UnsupportedConfigError(f"unsupported config field {key}={hf[key]!r}")
    for key, neutral in (("full_attn_mod", 1), ("interpolate_factor", 1), ("lm_head_bias", False)):
        if hf.get(key, neutral) != neutral:
            raise UnsupportedConfigError(f"unsupported config field {key}={hf[key]!r}")
    if hf.get("router_jitter_noise") and family != "mixtral":
        raise UnsupportedConfigError(f"unsupported config field router_jitter_noise={hf['router_jitter_noise']!r}")
    shape = _hf_shape(hf)
    theta, scaling, rotary = _rope(hf, shape["head_dim"])
    return ModelConfig(
        family=family,
        **shape,
        num_layers=int(hf["num_hidden_layers"]),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=(family == "qwen2"),
        sliding_window=int(sliding) if sliding else None,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        rotary_dim=rotary,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        **_experts(hf, family),
    )


# Llama-2-7B (MHA) and Mistral-7B v0.2/v0.3-style (GQA, no sliding window) shapes, the
# 70B shapes of the memory plan (`sharding.memory_plan`), and a few-MB model for tests on
# the CPU.
PRESETS = {
    "llama2-7b": dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=4096),
    "mistral-7b": dict(family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=1e6, max_position_embeddings=32768),
    "llama2-70b": dict(family="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                       num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=4096),
    "llama3-70b": dict(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192),
    # the new families' decode-benchmark shapes (random weights; issue 35's GPU rows)
    "qwen3-8b": dict(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
                     rope_theta=1e6, max_position_embeddings=40960, qk_norm=True),
    "qwen3-30b-a3b": dict(family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                          rope_theta=1e6, max_position_embeddings=40960, qk_norm=True, num_experts=128,
                          experts_per_token=8, moe_intermediate_size=768, norm_topk_prob=True),
    # Gemma-3-12B's text shapes: 48 layers, five sliding (window 1024, RoPE base 1e4) per
    # global one (RoPE 1e6, linear scaling 8), head_dim 256, 8 KV heads
    "gemma-3-12b": dict(family="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                        num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256, rms_norm_eps=1e-6,
                        rope_theta=1e6, rope_scaling=("linear", 8.0), tie_word_embeddings=True,
                        sliding_window=1024, qk_norm=True, max_position_embeddings=131072,
                        sliding_layers=tuple(i for i in range(48) if (i + 1) % 6), rope_local_theta=1e4,
                        query_pre_attn_scalar=256.0),
    "tiny": dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0),
}


def preset(name: str) -> ModelConfig:
    """The ModelConfig of a named shape in PRESETS ("tiny", "llama2-7b", "mistral-7b", ...)."""
    return ModelConfig(**PRESETS[name])
