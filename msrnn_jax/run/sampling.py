"""Sampling strategies: small frozen dataclasses, static under jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..errors import check_float, check_int


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature == 0 means greedy. top_k == 0 and top_p == 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_float("temperature", self.temperature, low=0.0)
        check_int("top_k", self.top_k, minimum=0)
        check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)

    @classmethod
    def of(cls, temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None) -> "Sampling":
        """Greedy when nothing is given; otherwise sampling at `temperature` (default 1)
        with the filters given. temperature 0 is greedy."""
        if temperature is None and top_k is None and top_p is None:
            return GREEDY
        t = 1.0 if temperature is None else temperature
        return cls(temperature=t, top_k=0 if top_k is None else top_k,
                   top_p=1.0 if top_p is None else top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits, key):
        """logits: [B, V] float32 -> token ids [B] int32."""
        if self.greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        logits = logits.astype(jnp.float32) / self.temperature
        if self.top_k:
            kth = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p < 1.0:
            # keep the smallest set of most likely tokens whose mass reaches top_p
            order = jnp.argsort(-logits, -1)
            sorted_logits = jnp.take_along_axis(logits, order, -1)
            probs = jax.nn.softmax(sorted_logits, -1)
            before = jnp.cumsum(probs, -1) - probs  # mass strictly above each token
            sorted_logits = jnp.where(before < self.top_p, sorted_logits, -jnp.inf)
            inv = jnp.argsort(order, -1)
            logits = jnp.take_along_axis(sorted_logits, inv, -1)
        return jax.random.categorical(key, logits, -1).astype(jnp.int32)


GREEDY = Sampling()
