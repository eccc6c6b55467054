"""Sampling: the settings (`Sampling`, validated once) and the one sampler (`sample_rows`),
which takes the settings per batch row as arrays so that one compiled program serves
greedy and sampled rows side by side (generation and the serving engine alike)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import check_float, check_int

MAX_TEMPERATURE = 2.0  # OpenAI's range, [0, 2]


def check_temperature(value) -> float:
    """The one temperature rule: a finite number in [0, 2] (0 = greedy)."""
    return check_float("temperature", value, low=0.0, high=MAX_TEMPERATURE)


def check_settings(temperature, top_k, top_p) -> tuple[float, int, float]:
    """Sampling settings checked once, for every caller (Python API, engine, server,
    command line): temperature in [0, 2], top_k >= 0 (0 = off), top_p in (0, 1]."""
    return (check_temperature(temperature), check_int("top_k", top_k, minimum=0),
            check_float("top_p", top_p, low=0.0, high=1.0, low_open=True))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature == 0 means greedy. top_k == 0 and top_p == 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_settings(self.temperature, self.top_k, self.top_p)

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

    def rows(self, batch: int):
        """These settings for every one of `batch` rows, as `sample_rows` takes them:
        (temperature [B] f32, top_k [B] int32, top_p [B] f32)."""
        return (np.full((batch,), self.temperature, np.float32), np.full((batch,), self.top_k, np.int32),
                np.full((batch,), self.top_p, np.float32))


GREEDY = Sampling()


def row_keys(seed: int, batch: int) -> np.ndarray:
    """Per-row PRNG keys (raw uint32 [B, 2]) of one seed: row b's stream is the b-th
    split of `seed` (a batch of one is the seed's own key)."""
    key = jax.random.key(seed)
    keys = key[None] if batch == 1 else jax.random.split(key, batch)
    return np.asarray(jax.random.key_data(keys), np.uint32)


def split_rows(keys):
    """Per-row PRNG keys (raw uint32 [B, 2]) -> (next keys, subkeys), each [B, 2]."""
    both = jax.vmap(lambda k: jax.random.split(k))(keys)  # [B, 2, 2]
    return both[:, 0], both[:, 1]


def sample_rows(logits, keys, temperature, top_k, top_p):
    """One token per row, each row with its own settings: logits [B, V]; keys uint32
    [B, 2]; temperature [B] f32 (0 = greedy); top_k [B] int32 (0 = off); top_p [B] f32
    in (0, 1] (1 = off). Top-k first, then the smallest most-likely set whose mass
    reaches top_p, then a draw at the temperature. Returns tokens [B] int32."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)

    def sampled():
        B, V = logits.shape
        x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        srt = -jnp.sort(-x, -1)  # descending
        rank = jnp.arange(V)[None]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
        probs = jax.nn.softmax(jnp.where(rank < k, srt, -jnp.inf), -1)
        before = jnp.cumsum(probs, -1) - probs  # mass strictly above each token
        keep = (rank < k) & (before < top_p[:, None])  # a prefix of the sorted tokens
        n_keep = jnp.maximum(keep.sum(-1), 1)
        threshold = jnp.take_along_axis(srt, (n_keep - 1)[:, None], -1)
        x = jnp.where(x < threshold, -jnp.inf, x)
        tok = jax.vmap(lambda key, row: jax.random.categorical(jax.random.wrap_key_data(key), row))(keys, x)
        return jnp.where(temperature > 0, tok.astype(jnp.int32), greedy)

    # an all-greedy batch skips the sort over the vocabulary
    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
