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
# # Bounding the state: which tokens to forget
#
# Notebook 1 showed that a decoder-only transformer is an *unbounded* multi-state RNN: its
# state, the (key, value) pairs of every layer, grows by one pair per token. A **bounded**
# MSRNN gives each layer only `C` slots. When they are full, each new token brings one pair
# too many, and a **policy** picks which of the `C + 1` candidates (the kept pairs and the
# new one) to drop:
#
# | policy | drops, when the state is full |
# |---|---|
# | `window` | the oldest token: the state is the last `C` tokens |
# | `sink` (Window+4, StreamingLLM) | the oldest token except the first 4, which are never dropped |
# | `h2o` (Heavy-Hitter Oracle) | protects the `C/2` most recent tokens, and among the others drops the one with the lowest attention *accumulated* over all steps so far |
# | `tova` (Token Omission Via Attention) | the token with the lowest attention from the *current* token, averaged over the heads of the layer |
#
# TOVA is the policy that Oren et al. (2024) propose: no recency rule, no history, just
# "forget what the current query looks at least". In this notebook we read a passage of a
# real book with each policy and look at
#
# 1. what each policy keeps, as a picture (step against position);
# 2. for TOVA: which positions every layer keeps, how many of them are recent, whether it
#    ever drops the first token (and why not), and which *kinds* of tokens it keeps
#    longest, the paper's analysis in §7.3;
# 3. perplexity against capacity for every policy.
#
# The sizes come from the settings below: 4 rows of 128 tokens, each read with 4 policies
# at 3 capacities by the 30-layer model, about three minutes on a 2-core CPU (the test
# suite sets `MSRNN_NB_SMALL=1`, which makes everything tiny). Raise `TOKENS` and
# `CAPACITIES` for a clearer picture if you have the time or a GPU; the paper reads
# thousands of tokens with capacities up to 512.

# %%
# %matplotlib inline
import io
import os
import tempfile
import time
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from IPython.display import Image, display

import msrnn_jax as m
from msrnn_jax.core.layers import token_nll
from msrnn_jax.run import analysis, plots

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, without ipywidgets

# -- settings --------------------------------------------------------------------------
REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()  # run from notebooks/ or the root
BOOK = os.environ.get("MSRNN_BOOK", str(REPO / "data" / "pg_news_from_nowhere.txt"))
START_AT = "I felt that I must make some conversation"  # skip the front matter
SMALL = os.environ.get("MSRNN_NB_SMALL") == "1"
TOKENS = 40 if SMALL else 128             # tokens per row
ROWS = 2 if SMALL else 4                  # consecutive passages, read together as one batch
CAPACITIES = (8, 16) if SMALL else (16, 32, 64)
CAPACITY = CAPACITIES[0] if SMALL else 32  # the capacity we look at closely
POLICIES = ("window", "sink", "h2o", "tova")

# %% [markdown]
# ## The text
#
# The default is William Morris's *News from Nowhere* (1890, Project Gutenberg), kept in the
# repository's `data/` folder; set
# `MSRNN_BOOK` (or `BOOK` above) to read another plain-text file. If the file is missing,
# the notebook writes a short text of its own and uses that.
#
# The passage is cut into `ROWS` consecutive pieces of `TOKENS` tokens. Batch rows are read
# in parallel by the same step, so several rows cost little more time than one.

# %%
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

model = m.load_model()
cfg = model.cfg
ids = model.encode(text[: 8 * ROWS * TOKENS])  # plenty of characters for ROWS * TOKENS tokens
ROWS = min(ROWS, len(ids) // TOKENS)
rows = np.asarray(ids[: ROWS * TOKENS], np.int32).reshape(ROWS, TOKENS)
print(f"{ROWS} rows of {TOKENS} tokens from {BOOK}; the first row begins:\n")
print(model.decode(rows[0, :60]))


# %% [markdown]
# ## Reading the passage with every policy
#
# `m.record_run` feeds token rows through the exact recurrent step (the one notebook 1
# checked against the transformer), token by token, and records two things: the loss on
# every next-token prediction, and the positions held in the state after every step, an
# array `pos[step, layer, row, kv_head, slot]` (`-1` for an empty slot).
#
# `m.record_policies` does the same for several policies at once: each policy gets
# its own copy of the rows, and all the copies go through the step together as one batch,
# each row following its own policy. Rows never interact, so this gives the same results as
# one run per policy, but the model's weights (most of a step's cost on a CPU) are read once
# per step for all of them.
#
# We record every policy at every capacity; everything below is computed from these
# recordings. The unbounded model needs no recording: notebook 1 showed that the parallel
# forward pass gives exactly its logits, and it is much faster. We also keep that pass's
# attention weights of the last token, which will explain some of TOVA's choices.

# %%
logits, _, _, attn_last, _ = m.forward_parallel(model.params, cfg, jnp.asarray(rows))
full_ppl = float(np.exp(token_nll(logits[:, :-1], jnp.asarray(rows[:, 1:])).mean()))
del logits
print(f"full (unbounded): perplexity {full_ppl:.2f}")

runs = {}  # (policy, capacity) -> analysis.Recording
for c in CAPACITIES:
    t0 = time.perf_counter()
    for p, rec in m.record_policies(model, POLICIES, c, rows).items():
        runs[p, c] = rec
    print(f"C={c:<4} " + "  ".join(f"{p} {runs[p, c].ppl:.2f}" for p in POLICIES)
          + f"   ({time.perf_counter() - t0:.0f} s)")

# %% [markdown]
# ## What each policy keeps
#
# A picture of a bounded state over time: one row per step (time runs down), one column per
# position in the text, dark where that position is in the state after that step. Every row
# has at most `C` dark cells. Here is one layer in the middle of the model, first batch row,
# for each policy:
#
# - `window` is a diagonal band: the last `C` tokens.
# - `sink` is the same band plus 4 vertical lines: the first 4 tokens, never dropped.
# - `h2o` keeps a band of recent tokens (half the slots) and, in the other half, older
#   tokens that have gathered much attention so far.
# - `tova` has no rule about age at all. Yet it keeps many recent tokens (a ragged band),
#   plus some vertical lines: tokens it holds on to for a long time.

# %%
LAYER = cfg.num_layers // 2
plots.plot_kept_maps(
    {p: analysis.kept_map(runs[p, CAPACITY].pos, LAYER) for p in POLICIES},
    ncols=4, title=f"layer {LAYER}, C = {CAPACITY}: kept positions (dark) after each step", panel_size=2.8)

# %% [markdown]
# ## TOVA, layer by layer
#
# Every layer decides on its own (its attention is its own), so the pictures differ. Here
# are all the layers for TOVA:

# %%
tova = runs["tova", CAPACITY]
plots.plot_kept_maps({f"layer {l}": analysis.kept_map(tova.pos, l) for l in range(cfg.num_layers)},
                     ncols=6, title=f"TOVA, C = {CAPACITY}: kept positions (dark) per layer", panel_size=1.8)

# %% [markdown]
# ### How much of the state is recent?
#
# A window of `C` slots holds exactly the `C` most recent tokens. TOVA holds some of them
# too, and something else in the other slots. Below: the share of TOVA's kept tokens that
# are among the `C` most recent ones (what a window would hold), per layer, averaged over
# the steps after the state has filled; and the ages (steps since the token was read) of
# the kept tokens, where a window's ages would be spread evenly from 0 to `C - 1`.

# %%
share = analysis.recent_share(tova.pos, recent=CAPACITY)[CAPACITY:]  # steps with a full state
print(f"on average {share.mean():.0%} of what TOVA keeps is among the last {CAPACITY} tokens "
      f"(layers range from {share.mean(0).min():.0%} to {share.mean(0).max():.0%})")
display(plots.plot_per_layer({"TOVA": share.mean(0), "window": np.ones(cfg.num_layers)},
                             f"share of kept tokens among the last {CAPACITY}",
                             title=f"recent tokens in the state, C = {CAPACITY}"))
plots.plot_histograms({p: analysis.kept_ages(runs[p, CAPACITY].pos, start=CAPACITY) for p in ("window", "tova")},
                      "age of a kept token (steps since it was read)",
                      title=f"ages of kept tokens, all layers, C = {CAPACITY}", bins=np.arange(TOKENS + 1) - 0.5)

# %% [markdown]
# Recency matters: most of what TOVA keeps is recent, because a token usually attends
# strongly to its neighbours. But a sizeable part of the state holds older tokens,
# different in each layer. That is the freedom a window lacks.
#
# ### Is the first token ever dropped?
#
# The vertical line at position 0 in most of the pictures above is the first token of each
# row. `analysis.first_token_kept` checks, for every layer, whether position 0 stayed in the
# state after every step, in every row:

# %%
kept_first = {p: analysis.first_token_kept(runs[p, CAPACITY].pos) for p in POLICIES}
for p in POLICIES:
    k = kept_first[p]
    dropped = [l for l in range(cfg.num_layers) if not k[l]]
    where = "" if not dropped else "; drops it in every layer" if k.sum() == 0 else f"; drops it in layers {dropped}"
    print(f"{p:>7}: keeps the first token in {k.sum():2d} of {cfg.num_layers} layers{where}")

# %% [markdown]
# `window` drops the first token as soon as the state is full; `sink` keeps it by
# construction. TOVA has no rule about the first token, and yet it keeps it, in all layers
# or nearly all. Why?
#
# ### Why TOVA keeps the first token: attention sinks
#
# Attention weights come from a softmax, so in every head they sum to 1. When a head has
# nothing useful to look at for the current token, the weight still has to go somewhere.
# Trained language models learn to park it on the **first token**: every later token can
# see it, and it carries little meaning of its own, so a lot of weight on it changes the
# output little. This is known as an *attention sink* (Xiao et al., 2023, "Efficient
# Streaming Language Models with Attention Sinks"). In most layers the first token soaks up
# a large share of the attention, at every step.
#
# TOVA drops the candidate with the **lowest** head-averaged attention. A token that takes,
# say, a third of all the attention is never the lowest, so TOVA never drops it, in every
# layer where the sink exists. No rule was needed: the attention itself says the token
# matters.
#
# We can see this directly. Below, for each layer, is the attention the *last* token of each
# row pays to the first token, averaged over heads (the number TOVA ranks by), next to the
# median weight of the other tokens, the smallest one, and what every token would get if
# attention were spread evenly.

# %%
fa = analysis.first_token_attention(attn_last)  # from the parallel pass over the full rows
print(f"{'layer':>5}  {'first token':>11}  {'median other':>12}  {'TOVA keeps it':>13}")
for l in range(cfg.num_layers):
    print(f"{l:>5}  {fa['first'][l]:>11.3f}  {fa['median_other'][l]:>12.4f}  {bool(kept_first['tova'][l])!s:>13}")
plots.plot_per_layer({"first token": fa["first"], "median of the others": fa["median_other"],
                      "smallest of the others": np.maximum(fa["min_other"], 1e-7), "even spread (1/T)": fa["uniform"]},
                     "head-averaged attention of the last token", logy=True,
                     title="the first token is an attention sink")

# %% [markdown]
# In most layers the first token takes far more attention than any other token, often a
# large fraction of the total, and those are the layers where TOVA keeps it. The layers
# where TOVA does let it go (in SmolLM2, the first two and one or two in the middle) are
# those where the first token's share is smallest, close to that of an ordinary token:
# those layers have no strong sink.
#
# This also explains the window's trouble. Once the first token leaves a window, the heads
# that parked their attention on it have to put that weight somewhere else, on tokens that
# do carry meaning, and the layer's output is disturbed. Keeping 4 sink tokens (`sink`)
# repairs most of the damage, as the perplexities above show.
#
# ### Which kinds of tokens does TOVA keep longest?
#
# The paper (§7.3) looks beyond the first token and asks which tokens TOVA holds on to.
# We sort tokens into kinds (punctuation, line breaks, quote marks, capitalised words,
# digits, the rest) with `analysis.token_kinds`, measure each token's **retention**, the
# number of steps it stayed in the state, averaged over layers and heads, and average that
# per kind. Only tokens read early enough to be dropped count (the first `TOKENS - C` of each
# row), and the first token is left out (it is a sink, not a typical token of its kind).

# %%
kinds = analysis.token_kinds(model.decode, rows)
stats = analysis.retention_by_kind(tova.pos, kinds, upto=TOKENS - CAPACITY)
print(f"{'kind':<12} {'tokens':>6} {'TOVA: mean steps kept':>22}  (a window keeps every token {CAPACITY} steps)")
for kind, (mean, n) in stats.items():
    print(f"{kind:<12} {n:>6} {mean:>22.1f}")
present = {k: v[0] for k, v in stats.items() if v[1] > 0}
plots.plot_bars(present, "mean steps kept", title=f"TOVA, C = {CAPACITY}: retention by token kind",
                annotations={k: f"n={stats[k][1]}" for k in present})

# %% [markdown]
# Which individual tokens lived longest? Below are the longest-kept tokens of the first row
# (again averaged over layers), with a little context:

# %%
steps, _ = analysis.retention(tova.pos)
per_token = steps.mean((0, 2))[0]  # [T] average over layers and heads, first row
for p in np.argsort(-per_token[1:TOKENS - CAPACITY])[:10] + 1:
    token, context = model.decode([rows[0, p]]), model.decode(rows[0, max(p - 5, 0):p + 1])
    print(f"{per_token[p]:6.1f} steps  {token!r:<14} {kinds[0, p]:<12} ...{context!r}")

# %% [markdown]
# Punctuation and line breaks tend to outlive ordinary words. They close clauses and lines;
# one explanation is that the model gathers a summary of the clause or line on them, so
# later tokens keep attending to them. (With the short test settings the counts are tiny;
# with the defaults the pattern is clearer.)
#
# ## Perplexity against capacity
#
# Finally, what does forgetting cost? Perplexity (the exponential of the average loss per
# token; lower is better) for each policy and capacity, with the unbounded model as the
# dashed line. `plots.plot_ppl_vs_capacity` draws the same figure as `msrnn ppl --plot`.

# %%
results = [{"policy": "full", "capacity": TOKENS, "ppl": full_ppl}]
results += [{"policy": p, "capacity": c, "ppl": r.ppl} for (p, c), r in runs.items()]
print(f"{'policy':>7} " + " ".join(f"{'C=' + str(c):>8}" for c in CAPACITIES) + f"   full: {full_ppl:.2f}")
for p in POLICIES:
    print(f"{p:>7} " + " ".join(f"{runs[p, c].ppl:8.2f}" for c in CAPACITIES))
buf = io.BytesIO()
plots.plot_ppl_vs_capacity(results, buf, title=f"SmolLM2-135M, {ROWS} x {TOKENS} tokens of {Path(BOOK).name}")
Image(buf.getvalue())

# %% [markdown]
# What to look for (the pattern sharpens with longer texts):
#
# - `window` is by far the worst: as soon as it drops the first token it loses the
#   attention sink.
# - `sink` repairs that with 4 permanent slots, but otherwise still only sees the last
#   tokens.
# - `h2o` keeps useful old tokens, but ranks them by attention accumulated over the whole
#   past, which favours tokens that have simply been around longer.
# - `tova` is clearly ahead where the state is small, which is where the choice matters
#   most. It needs no recency rule and no sink rule: ranking by the current token's
#   attention keeps the recent tokens, the sink, and the few older tokens the model still
#   looks at. When `C` is a large fraction of the text (64 of 128 tokens), every sensible
#   policy keeps most of what matters and the three good ones come within a few percent of
#   the unbounded model; on a passage this short their order there is within noise.
#
# The paper's experiments are larger: with LLaMA-2-7B on long books (PG-19), TOVA with
# `C = 512` is within about 0.3 perplexity of the full 4k-token context, and ahead of the
# other policies at every capacity.
#
# ## Does the state keep a needle?
#
# Perplexity averages over every next word. A long-context task asks something sharper:
# is the one fact a later question needs still in the state? `msrnn eval passkey` hides a
# 5-digit pass key in repeated filler and asks for it at the end (`longcontext.make_prompt`
# builds one such prompt and says where the needle sits). Below, each policy reads the
# prompt into a state much smaller than it; we count, per layer, the share of the needle's
# tokens still held after the whole prompt (for `tova-head`, averaged over the KV heads),
# and let the model answer.

# %%
from msrnn_jax.run import decoding, longcontext

N_PROMPT = 200 if SMALL else 1024  # prompt tokens
C_NEEDLE = 32 if SMALL else 128    # the state: an eighth of the prompt
prompt = longcontext.make_prompt(model, "passkey", N_PROMPT, 0.25, sample=0, seed=0)
lo, hi = prompt.needle_start, prompt.needle_start + prompt.needle_len
print(f"{N_PROMPT} prompt tokens, C = {C_NEEDLE}; the needle is tokens {lo}..{hi - 1}: "
      f"{model.decode(prompt.ids[lo:hi])!r}\n")
needle_kept = {}  # policy -> [L] share of the needle's tokens in the state, per layer
for name in ("window", "sink", "h2o", "tova", "tova-head"):
    pol = m.make_policy(name)
    _, st = decoding.prefill(model.params, cfg, pol, None, C_NEEDLE, [list(prompt.ids)])
    pos = np.asarray(st.pos)[:, 0]  # [L, Hkv, C]
    needle_kept[name] = ((pos >= lo) & (pos < hi)).sum(-1).mean(-1) / (hi - lo)
    answer = model.decode(m.generate(model, [list(prompt.ids)], 8, policy=name, capacity=C_NEEDLE).tokens[0])
    print(f"{name:>9}: {needle_kept[name].mean():4.0%} of the needle kept on average over the layers; "
          f"answers {answer.strip()!r} (the key is {prompt.expected})")
layers_with = np.flatnonzero(needle_kept["tova"] > 0)
print(f"\nTOVA keeps part of the needle in {len(layers_with)} of {cfg.num_layers} layers: {layers_with.tolist()}")
plots.plot_per_layer(needle_kept, "share of the needle's tokens in the state",
                     title=f"which layers keep the needle, {N_PROMPT}-token prompt, C = {C_NEEDLE}")

# %% [markdown]
# `window` and `sink` cannot keep it: the needle is far older than the last `C` tokens.
# With the default settings (1024 tokens, C = 128, the needle a quarter of the way in) no
# policy answers with the key, and the picture says why. TOVA keeps a few of the needle's
# tokens in a handful of layers only (7, 10, 11, 20, 24, 26, 28 and 29 kept 4-16% of
# them when we ran it) and none in the rest: the filler after the needle draws the
# attention, and the key's digits, once read, are rarely looked at again until the
# question comes, too late. H2O, whose scores accumulate over the whole past, keeps more
# of the needle (17% on average, in most layers), but not the digits the answer needs.
# An attention-ranked policy keeps what the *current* token attends to; a fact that
# matters only later is exactly what it forgets. `msrnn eval` measures this over
# lengths, depths and capacities (docs/results.md has the results).
#
# **Notebook 3** trains a tiny transformer from scratch and runs it as a bounded MSRNN.
