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
# # Train a tiny multi-state RNN
#
# Notebooks 1 and 2 took a pretrained model. Here we train our own, a tiny byte-level
# transformer, from scratch with `optax` on a short text, in about a minute on a CPU.
# Then we run the trained model the other way, as a recurrent network, token by token, and
# bound its state with TOVA and with a window: how do perplexity and generated text change
# with the capacity?
#
# Training uses the transformer's *parallel* form: the whole sequence goes through each
# layer at once, with a causal mask (`forward_parallel`). Inference uses its *recurrent*
# form (`step`, inside `m.run_policy` and `m.generate`). Notebook 1 showed they are the same
# function, so the weights trained one way work the other way.

# %%
# %matplotlib inline
import inspect
import io
import os
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from IPython.display import Image

import msrnn_jax as m
from msrnn_jax.run import analysis, plots

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, without ipywidgets

# -- settings --------------------------------------------------------------------------
REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()  # run from notebooks/ or the root
TEXT = os.environ.get("MSRNN_TINY_TEXT", str(REPO / "data" / "pg_news_from_nowhere.txt"))
SMALL = os.environ.get("MSRNN_NB_SMALL") == "1"
TRAIN_STEPS = 15 if SMALL else 400       # about a minute on a 2-core CPU
SEQ = 256                                # training (and evaluation) sequence length, in bytes
BATCH = 4
EVAL_ROWS = 4 if SMALL else 16
CAPACITIES = (4, 16) if SMALL else (2, 4, 8, 16, 32, 64, 128)
SAMPLE_BYTES = 40 if SMALL else 200      # prompt + sample stay within SEQ, the trained length

# %% [markdown]
# ## The data: bytes
#
# A byte-level model needs no tokenizer: every byte of the UTF-8 text is a token, so the
# vocabulary has 256 entries. The default text is the book notebook 2 reads, William
# Morris's *News from Nowhere* (420 kB, in the repository's `data/` folder); set
# `MSRNN_TINY_TEXT` to train on another file, such as the classic *tiny shakespeare*. If the
# file is missing, the notebook uses the source code of a few Python standard-library
# modules instead. The last 10% is held out for evaluation.

# %%
if Path(TEXT).is_file():
    data = Path(TEXT).read_bytes()
else:
    import json.decoder  # any plain text will do
    import string
    import textwrap
    data = "\n".join(inspect.getsource(mod) for mod in (json.decoder, textwrap, string)).encode()
    print(TEXT, "not found: training on Python source code instead")
data = np.frombuffer(data, np.uint8)
split = int(0.9 * len(data))
train, held_out = data[:split], data[split:]
print(f"{len(train):,} training bytes, {len(held_out):,} held out; a sample:\n")
print(bytes(train[:200]).decode("utf-8", "replace"))

# %% [markdown]
# ## The model
#
# A llama-like decoder, like SmolLM2 but tiny: 2 layers, hidden size 128, 4 query heads
# sharing 2 key/value heads (grouped-query attention), RoPE positions, the input embedding
# reused as the output layer. `init_params` gives random weights in the shapes the
# configuration implies; they are a plain nested dict of arrays.

# %%
cfg = m.ModelConfig(family="llama", vocab_size=256, hidden_size=128, intermediate_size=256,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                  max_position_embeddings=SEQ, tie_word_embeddings=True)
params = m.init_params(cfg, jax.random.key(0))
n_params = sum(x.size for x in jax.tree.leaves(params))
print(f"{n_params:,} parameters; the state holds {cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2} "
      "numbers per token read")

# %% [markdown]
# ## Training
#
# The loss is the usual next-byte cross-entropy over random windows of `SEQ` bytes, computed
# from the logits of `forward_parallel`. AdamW with a short warm-up and a cosine decay;
# `jax.jit` compiles the whole update once.

# %%
warmup = max(1, min(20, TRAIN_STEPS // 10))
schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, TRAIN_STEPS, 3e-4)
optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
opt_state = optimizer.init(params)

def loss_fn(params, x, y):
    logits = m.forward_parallel(params, cfg, x)[0]  # [B, SEQ, 256]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

@jax.jit
def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

def batch(rng, source, n):
    start = rng.integers(0, len(source) - SEQ - 1, n)
    window = np.stack([source[s:s + SEQ + 1] for s in start]).astype(np.int32)
    return window[:, :-1], window[:, 1:]

rng = np.random.default_rng(0)
losses, t0 = [], time.perf_counter()
for i in range(TRAIN_STEPS):
    params, opt_state, loss = train_step(params, opt_state, *batch(rng, train, BATCH))
    losses.append(float(loss))
    if i % 50 == 0 or i == TRAIN_STEPS - 1:
        print(f"step {i:4d}  loss {losses[-1]:.3f} nats/byte  ({time.perf_counter() - t0:.0f} s)")
plots.plot_lines(range(len(losses)), {"training loss": losses}, "step", "nats per byte",
                 title="training the tiny transformer")

# %% [markdown]
# ## The trained model as an RNN
#
# `m.Model` wraps the parameters so the library's tools accept them (a byte-level model
# has no tokenizer). `m.run_policy` reads token rows with the recurrent step, exactly,
# and returns the loss of every next-token prediction.
#
# First a check that connects to notebook 1: the unbounded MSRNN (`full`) must give the
# same loss as the parallel pass we trained with.

# %%
tiny = m.Model(cfg, params, None, "tiny byte model")
starts = np.linspace(0, len(held_out) - SEQ - 1, EVAL_ROWS).astype(int)
rows = np.stack([held_out[s:s + SEQ] for s in starts]).astype(np.int32)  # [EVAL_ROWS, SEQ]

full = m.run_policy(tiny, "full", None, rows)
x, y = jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])
parallel_nll = float(loss_fn(params, x, y))
print(f"held-out loss: recurrent {full.mean_nll:.4f}, parallel {parallel_nll:.4f}  "
      f"-> perplexity {full.ppl:.2f} per byte")
assert abs(full.mean_nll - parallel_nll) < 1e-3

# %% [markdown]
# ## Bounding the state
#
# Now the same rows with `C` slots per layer, for TOVA and for a window. With `C` as small
# as 2 the model sees almost nothing of the past; with `C = SEQ` a bounded state is the full
# one. `m.sweep` runs every policy at every capacity; the policies of one capacity go
# through the step together, as batch rows of one run (the rows never interact).

# %%
results = [{"policy": "full", "capacity": SEQ, "ppl": full.ppl}]
for r in m.sweep(tiny, ["window", "tova"], CAPACITIES, rows):  # both policies share each run
    results.append({"policy": r.policy.name, "capacity": r.capacity, "ppl": r.run.ppl})
    print(f"{r.policy.name:>7}  C={r.capacity:<3} perplexity {r.run.ppl:6.3f} per byte")
buf = io.BytesIO()
plots.plot_ppl_vs_capacity(results, buf, title=f"tiny byte-level model, {EVAL_ROWS} x {SEQ} held-out bytes")
Image(buf.getvalue())

# %% [markdown]
# Both policies converge to the full model as `C` grows, and even a handful of slots gets
# close: a tiny model trained for a minute predicts mostly from the last few bytes (how a
# word goes on, where a line breaks). Here, unlike with SmolLM2 in notebook 2, a *window* is
# about as good as TOVA, sometimes slightly better, and it does not collapse when it drops
# the first token. Why? Recall notebook 2: a window fails on a pretrained model because it
# evicts the *attention sink*, and TOVA wins because the model's attention singles out a few
# older tokens worth keeping. Does our tiny model have a sink? The same measurement as in
# notebook 2, the head-averaged attention of the last byte of each row:

# %%
_, _, _, attn_last, _ = m.forward_parallel(params, cfg, jnp.asarray(rows))
fa = analysis.first_token_attention(attn_last)
for l in range(cfg.num_layers):
    print(f"layer {l}: first byte {fa['first'][l]:.3f}, median of the others {fa['median_other'][l]:.4f}, "
          f"even spread {fa['uniform'][l]:.4f}")

# %% [markdown]
# Unless training has run much longer than the default, the first byte gets no special
# share of the attention: there is no sink to lose, and what this model attends to is
# mostly recent. For such a model the recency rule of a window is already the right
# policy, and TOVA, which must rediscover recency from the attention weights, can only
# match it. Sinks and long-range attention appear as models grow and train longer, and that
# is where a policy that reads the attention pays off.
#
# ## Samples
#
# Finally, let the model write. `m.generate` reads a prompt into a state of `C` slots and then
# samples one byte at a time, always with the same random seed, so any difference between
# the samples comes from what the state remembers.

# %%
prompt = bytes(held_out[starts[0]:starts[0] + 48])
print("prompt:", repr(prompt.decode("utf-8", "replace")), "\n")
sampling = m.Sampling(temperature=0.8, top_k=40)
sample_caps = (min(CAPACITIES),) if SMALL else (min(CAPACITIES), max(CAPACITIES))
for policy, c in [("full", None)] + [(p, c) for c in sample_caps for p in ("window", "tova")]:
    out = m.generate(tiny, [list(prompt)], SAMPLE_BYTES, policy=policy, capacity=c, sampling=sampling, seed=0)
    label = policy if c is None else f"{policy}, C={c}"
    print(f"--- {label}\n{bytes(out.tokens[0]).decode('utf-8', 'replace')}\n")

# %% [markdown]
# With very few slots the text loses its thread (names, line structure) sooner; with more
# it looks like the full model's. Training longer, or a larger model, makes the model rely
# on more distant context, and the gap between a window and TOVA grows: try
# `TRAIN_STEPS = 3000` (about ten minutes on a CPU) and compare.
#
# That is the whole idea of the paper in one loop: a transformer is an RNN whose state is its
# (key, value) pairs; bounding that state turns it into an RNN of fixed size, and a good
# policy decides what to forget.
