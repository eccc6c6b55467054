"""A deliberately simple, independent reference of the bounded multi-state RNN.

The executable specification: plain numpy and Python lists, one batch row, one token at a
time, float32 math, written from docs/design.md §3 (one step, every policy, ties) and §4
(prefill modes) alone. It imports nothing from this package (only numpy), so the tests'
agreement between it and `core.step` / `core.policies` means something. Slow by design:
read it to learn what a policy does; run it on tiny models only.

Every layer keeps, per KV head, a Python list of `Entry(pos, k, v, score)`. A step:

1. q, k, v of the new token (RoPE at its position p);
2. candidates = kept entries + the new token;
3. attention over the visible candidates, float32 softmax;
4. the policy: fewer than C kept -> append; else drop exactly one of the C+1 candidates.

Layer groups (§12, Gemma 3): a sliding layer of window W sees the token itself and the
W - 1 before it; it keeps exactly those (`window` at W - 1 entries) and rotates with its
own RoPE base; the user's policy and capacity apply to the other (global) layers only.
Gemma's layer: norms scaled by 1 + w, norms around the attention's output and around the
MLP, the embedding times sqrt(E), scores scaled 1/sqrt(query_pre_attn_scalar), GELU-tanh,
logits capped by cap tanh(logits / cap).

The `oneshot` and `chunked` prefill modes reduce many candidates to C at once with one
"keep" rule (ties: the smallest position is dropped first), written separately from the
one-step "drop" rule so that `chunked S=1 == exact` is a real check.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
POLICIES = ("full", "window", "sink", "tova", "tova-head", "h2o", "h2o-head")
HEADWISE = ("tova-head", "h2o-head")
STORE_MAX = {"int8": 127.0, "fp8": 448.0}  # the 8-bit states of docs/design.md §13


def stored(x: np.ndarray, kind: str | None) -> np.ndarray:
    """A key or value vector [D] as an 8-bit state keeps it, read back (§13): q = x / s with
    s = max|x| / QMAX; int8 rounds q to the nearest integer, fp8 to the nearest
    float8_e4m3fn number (3 mantissa bits; below 2^-6 the step stays 2^-9), ties to even
    in both; the slot then reads q * s. kind None: kept as it is."""
    if kind is None:
        return x
    x = x.astype(F32)
    s = F32(np.abs(x).max() / F32(STORE_MAX[kind]))
    y = (x / (s if s > 0 else F32(1))).astype(F32)
    if kind == "int8":
        q = np.clip(np.round(y), -127, 127)
    else:
        exponent = np.floor(np.log2(np.maximum(np.abs(y), F32(2.0 ** -6))))
        step = (2.0 ** (exponent - 3)).astype(F32)
        q = np.round(y / step) * step
    return (q.astype(F32) * s).astype(F32)


def numpy_params(params) -> dict:
    """The parameter pytree (nested dicts of jax arrays) as float32 numpy arrays."""
    if isinstance(params, dict):
        return {k: numpy_params(v) for k, v in params.items()}
    return np.asarray(params, dtype=F32)


class Entry:
    """One kept (key, value) pair of one KV head of one layer."""

    __slots__ = ("pos", "k", "v", "score")

    def __init__(self, pos: int, k: np.ndarray, v: np.ndarray, score=0.0):
        self.pos = int(pos)
        self.k = k
        self.v = v
        self.score = F32(score)

    def __repr__(self):  # pragma: no cover (debugging aid)
        return f"Entry(pos={self.pos}, score={self.score})"


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s.astype(F32)
    m = np.max(s)
    e = np.exp(s - m).astype(F32)
    return (e / e.sum(dtype=F32)).astype(F32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(F32)
    m = x.max(-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))).astype(F32)


class ReferenceMSRNN:
    """One batch row of the bounded MSRNN. `policy` is a name from `POLICIES`."""

    def __init__(self, params, cfg, policy: str, capacity: int, sinks: int = 4,
                 positions: str = "absolute", state_dtype: str | None = None):
        if policy not in POLICIES:
            raise ValueError(policy)
        if state_dtype not in (None, *STORE_MAX):
            raise ValueError(state_dtype)
        self.state_dtype = state_dtype  # None: entries kept at full precision
        if positions not in ("absolute", "reindex"):
            raise ValueError(positions)
        self.positions = positions
        if policy == "sink" and not capacity > sinks:
            raise ValueError("sink needs capacity > sinks")
        self.p = numpy_params(params)
        self.cfg = cfg
        self.policy = self.user_policy = policy
        self.C = self.user_C = int(capacity)
        self.sinks = int(sinks)
        self.inv_freq = np.asarray(cfg.inv_freq(), F32)
        self.gemma = cfg.family == "gemma3_text"
        self.sliding = set(getattr(cfg, "sliding_layers", ()) or ())  # empty: every layer alike
        self.layer = 0
        self.G = cfg.num_heads // cfg.num_kv_heads
        self.kept = [[[] for _ in range(cfg.num_kv_heads)] for _ in range(cfg.num_layers)]
        self.length = 0

    # -- layer groups -----------------------------------------------------------------
    def _enter(self, layer):
        """Work on `layer` from here: its policy and capacity (a sliding layer of window W:
        window, W - 1 entries; any other: the user's)."""
        self.layer = layer
        if layer in self.sliding:
            self.policy, self.C = "window", max(self.cfg.sliding_window - 1, 1)
        else:
            self.policy, self.C = self.user_policy, self.user_C

    def _window(self):
        """The current layer's window, or None."""
        if self.sliding:
            return self.cfg.sliding_window if self.layer in self.sliding else None
        return self.cfg.sliding_window

    # -- model pieces ------------------------------------------------------------------
    def _lp(self, name, layer):
        return self.p["layers"][name][layer]

    def _rms(self, x, w):
        x = x.astype(F32)
        var = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
        scale = (F32(1) + w).astype(F32) if self.gemma else w  # gemma: 1 + w
        return (scale * (x / np.sqrt(var + F32(self.cfg.rms_norm_eps)))).astype(F32)

    def _rope(self, x, pos):
        """Rotate-half RoPE of one token's heads x [H, D] at position `pos`, on the first R
        dims of each head (R = D unless the config rotates part of it). LongRoPE: the long
        factors from its original context on; LongRoPE, YaRN: cos and sin times their
        attention factor."""
        inv, mscale = self.inv_freq, F32(1)
        scaling = self.cfg.rope_scaling
        if self.layer in self.sliding:  # a sliding layer: its own base, no scaling
            R = self.cfg.head_dim
            inv = (1.0 / (F32(self.cfg.rope_local_theta) ** (np.arange(0, R, 2).astype(F32) / F32(R)))).astype(F32)
            scaling = None
        if scaling is not None and scaling[0] == "longrope":
            inv = np.asarray(self.cfg.inv_freq(long=pos >= scaling[3]), F32)
        if scaling is not None and scaling[0] in ("longrope", "yarn"):
            mscale = F32(scaling[-1])
        R = 2 * len(inv)
        ang = (F32(pos) * inv).astype(F32)                  # [R/2]
        cos = (np.cos(np.concatenate([ang, ang])).astype(F32) * mscale).astype(F32)
        sin = (np.sin(np.concatenate([ang, ang])).astype(F32) * mscale).astype(F32)
        xr, rest = x[..., :R], x[..., R:]
        half = R // 2
        rot = np.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
        return np.concatenate([xr * cos + rot * sin, rest], axis=-1).astype(F32)

    def _qkv(self, layer, h, pos):
        """q [Hq, D], k [Hkv, D] (both roped at `pos`), v [Hkv, D] of one token."""
        cfg = self.cfg
        D = cfg.head_dim
        q = h @ self._lp("wq", layer)
        k = h @ self._lp("wk", layer)
        v = h @ self._lp("wv", layer)
        if cfg.qkv_bias:
            q = q + self._lp("bq", layer)
            k = k + self._lp("bk", layer)
            v = v + self._lp("bv", layer)
        q = q.astype(F32).reshape(cfg.num_heads, D)
        k = k.astype(F32).reshape(cfg.num_kv_heads, D)
        v = v.astype(F32).reshape(cfg.num_kv_heads, D)
        if cfg.qk_norm:  # qwen3: every head's q and k RMS-normed, before RoPE
            q = self._rms(q, self._lp("q_norm", layer))
            k = self._rms(k, self._lp("k_norm", layer))
        if self.positions == "reindex":  # rotated at read time, by rank (`_attend`)
            return q, k, v
        return self._rope(q, pos), self._rope(k, pos), v

    def _mlp(self, layer, h):
        """The MLP of one token h [E] or of several [S, E]."""
        if self.gemma:  # GELU (tanh approximation) of the gate
            g = (h @ self._lp("w_gate", layer)).astype(F32)
            gelu = F32(0.5) * g * (F32(1) + np.tanh(F32(math.sqrt(2 / math.pi)) * (g + F32(0.044715) * g ** 3)))
            return ((gelu * (h @ self._lp("w_up", layer))).astype(F32) @ self._lp("w_down", layer)).astype(F32)
        if self.cfg.num_experts:
            return np.stack([self._experts(layer, x) for x in h]) if h.ndim == 2 else self._experts(layer, h)
        return self._swiglu(h, self._lp("w_gate", layer), self._lp("w_up", layer), self._lp("w_down", layer))

    @staticmethod
    def _swiglu(h, w_gate, w_up, w_down):
        g = (h @ w_gate).astype(F32)
        u = (h @ w_up).astype(F32)
        silu = g / (F32(1) + np.exp(-g))
        return ((silu * u).astype(F32) @ w_down).astype(F32)

    def _experts(self, layer, h):
        """Routed MLPs: softmax over the experts' router logits, the k largest chosen (ties:
        the lower expert), their weights renormalised if the config says so, and the
        chosen experts' SwiGLU outputs summed with those weights."""
        cfg = self.cfg
        probs = _softmax((h @ self._lp("router", layer)).astype(F32))
        chosen = sorted(range(cfg.num_experts), key=lambda e: (-probs[e], e))[:cfg.experts_per_token]
        weights = probs[chosen]
        if cfg.norm_topk_prob:
            weights = (weights / weights.sum(dtype=F32)).astype(F32)
        out = np.zeros_like(h, dtype=F32)
        for e, w in zip(chosen, weights):
            out += w * self._swiglu(h, self._lp("experts_gate", layer)[e], self._lp("experts_up", layer)[e],
                                    self._lp("experts_down", layer)[e])
        return out.astype(F32)

    def _logits(self, x):
        h = self._rms(x, self.p["final_norm"])
        head = self.p["embed"].T if self.cfg.tie_word_embeddings else self.p["lm_head"]
        logits = (h @ head).astype(F32)
        cap = getattr(self.cfg, "final_logit_softcapping", None)
        return logits if cap is None else (np.tanh(logits / F32(cap)) * F32(cap)).astype(F32)

    def _embed(self, tokens):
        x = self.p["embed"][tokens].astype(F32)
        return (x * F32(math.sqrt(self.cfg.hidden_size))).astype(F32) if self.gemma else x

    def _residual(self, layer, x, attn_out):
        """x plus the attention's output [.., Hq*D] projected (gemma: normed), then plus the MLP."""
        o = (attn_out @ self._lp("wo", layer)).astype(F32)
        if self.gemma:
            x = (x + self._rms(o, self._lp("post_attn_norm", layer))).astype(F32)
            m = self._mlp(layer, self._rms(x, self._lp("mlp_norm", layer)))
            return (x + self._rms(m, self._lp("post_mlp_norm", layer))).astype(F32)
        x = (x + o).astype(F32)
        return (x + self._mlp(layer, self._rms(x, self._lp("mlp_norm", layer)))).astype(F32)

    def _visible(self, key_pos, query_pos):
        W = self._window()
        return key_pos <= query_pos and (W is None or key_pos > query_pos - W)

    def _attend(self, q_heads, entries, query_pos):
        """Attention of the query heads of one KV head over `entries`.

        Returns (weights [G, n] float32, outputs [G, D])."""
        if self.positions == "reindex":
            # docs/design.md §8: each key, stored unrotated, is rotated by its rank among
            # the candidates in order of original position (the kept ones get 0..n-1, the
            # new tokens n, n+1, ...), and the query by the rank of its own token
            order = sorted(range(len(entries)), key=lambda i: entries[i].pos)
            rank = {entries[i].pos: r for r, i in enumerate(order)}
            self.max_rotation = max(getattr(self, "max_rotation", 0), len(entries) - 1)
            K = np.stack([self._rope(e.k, rank[e.pos]) for e in entries])
            q_heads = np.stack([self._rope(q, rank[query_pos]) for q in q_heads])
        else:
            K = np.stack([e.k for e in entries])             # [n, D]
        V = np.stack([e.v for e in entries])
        visible = np.array([self._visible(e.pos, query_pos) for e in entries])
        qpas = getattr(self.cfg, "query_pre_attn_scalar", None)
        scale = F32(1.0 / math.sqrt(qpas or self.cfg.head_dim))
        ws, outs = [], []
        for q in q_heads:
            s = (K @ q).astype(F32) * scale
            s = np.where(visible, s, -np.inf).astype(F32)
            w = _softmax(s)
            ws.append(w)
            outs.append((w @ V).astype(F32))
        return np.stack(ws).astype(F32), np.stack(outs).astype(F32)

    # -- policies ------------------------------------------------------------------------
    def _drop_index(self, cands, a):
        """docs/design.md §3: which of the C+1 candidates (one KV head's list) to drop.

        `a`: head-averaged attention per candidate; h2o scores are already updated."""
        pos = [c.pos for c in cands]
        n = len(cands)
        idx = range(n)
        if self.policy == "window":
            return min(idx, key=lambda i: pos[i])
        if self.policy == "sink":
            return min((i for i in idx if pos[i] >= self.sinks), key=lambda i: pos[i])
        if self.policy in ("tova", "tova-head"):
            # argmin of a; ties -> the smallest position
            return min(idx, key=lambda i: (a[i], pos[i]))
        if self.policy in ("h2o", "h2o-head"):
            n_protect = self.C // 2
            by_pos = sorted(idx, key=lambda i: pos[i], reverse=True)
            protected = set(by_pos[:n_protect])
            return min((i for i in idx if i not in protected), key=lambda i: (cands[i].score, pos[i]))
        raise AssertionError(self.policy)

    def _keep_indices(self, cands, a):
        """§4: reduce any number of candidates to C at once (oneshot / chunked).

        Ties: the smallest position is dropped first (kept last)."""
        n = len(cands)
        if self.policy == "full" or n <= self.C:
            return list(range(n))
        pos = [c.pos for c in cands]
        C = self.C
        idx = list(range(n))
        if self.policy == "window":
            return sorted(idx, key=lambda i: pos[i], reverse=True)[:C]
        if self.policy == "sink":
            first = [i for i in idx if pos[i] < self.sinks]
            rest = sorted((i for i in idx if pos[i] >= self.sinks), key=lambda i: pos[i], reverse=True)
            return first + rest[:C - len(first)]
        if self.policy in ("tova", "tova-head"):
            return sorted(idx, key=lambda i: (a[i], pos[i]), reverse=True)[:C]
        if self.policy in ("h2o", "h2o-head"):
            n_protect = C // 2
            by_pos = sorted(idx, key=lambda i: pos[i], reverse=True)
            protected = by_pos[:n_protect]
            rest = sorted(by_pos[n_protect:], key=lambda i: (cands[i].score, pos[i]), reverse=True)
            return protected + rest[:C - n_protect]
        raise AssertionError(self.policy)

    def _averages(self, cand_lists, weights):
        """Per KV head, the attention that the policy ranks by, one value per candidate.

        weights[h]: [G, n_h] weights of the query heads sharing KV head h over
        cand_lists[h]. Head-wise policies: a_h = mean over those G heads. Layer-wise:
        a = mean over all Hq heads (the candidate lists are then the same in every head)."""
        if self.policy in HEADWISE:
            return [w.mean(0, dtype=F32).astype(F32) for w in weights]
        positions = [[c.pos for c in cl] for cl in cand_lists]
        assert all(p == positions[0] for p in positions), "layer-wise policy diverged across heads"
        a = np.concatenate(weights, axis=0).mean(0, dtype=F32).astype(F32)
        return [a for _ in weights]

    def _apply_step_policy(self, layer, cand_lists, weights):
        """One step's update of one layer's kept lists (docs/design.md §3 step 4)."""
        avgs = self._averages(cand_lists, weights)
        for h, (cands, a) in enumerate(zip(cand_lists, avgs)):
            if self.policy in ("h2o", "h2o-head"):
                for c, ai in zip(cands, a):      # new token starts at 0
                    c.score = F32(c.score + ai)
            if self.policy == "full" or len(cands) <= self.C:
                self.kept[layer][h] = list(cands)  # an empty slot: the new token fills it
                continue
            drop = self._drop_index(cands, a)
            self.kept[layer][h] = [c for i, c in enumerate(cands) if i != drop]

    def _apply_keep(self, layer, cand_lists, avgs):
        for h, (cands, a) in enumerate(zip(cand_lists, avgs)):
            keep = self._keep_indices(cands, a)
            self.kept[layer][h] = [cands[i] for i in sorted(keep, key=lambda i: cands[i].pos)]

    # -- the three ways of consuming tokens ------------------------------------------------
    def step(self, token: int) -> np.ndarray:
        """Exact mode: one token through every layer. Returns logits [V]."""
        cfg = self.cfg
        p = self.length
        x = self._embed(int(token))
        for layer in range(cfg.num_layers):
            self._enter(layer)
            h = self._rms(x, self._lp("attn_norm", layer))
            q, k, v = self._qkv(layer, h, p)
            out = np.zeros((cfg.num_heads, cfg.head_dim), F32)
            cand_lists, weights = [], []
            for kh in range(cfg.num_kv_heads):
                cands = self.kept[layer][kh] + [Entry(p, k[kh], v[kh], 0.0)]
                w, o = self._attend(q[kh * self.G:(kh + 1) * self.G], cands, p)
                out[kh * self.G:(kh + 1) * self.G] = o
                cand_lists.append(cands)
                weights.append(w)
            self._apply_step_policy(layer, cand_lists, weights)
            self._store_new(layer, p)
            x = self._residual(layer, x, out.reshape(-1))
        self.length += 1
        return self._logits(x)

    def chunk(self, tokens) -> np.ndarray:
        """Chunked mode: S tokens attend to the kept state + the causal chunk; then each
        layer reduces its C+S candidates to C (tova: the chunk's last token's attention;
        h2o: score += column sums over the chunk's query rows). Returns logits [S, V]."""
        cfg = self.cfg
        tokens = [int(t) for t in tokens]
        S = len(tokens)
        p0 = self.length
        G = self.G
        xs = self._embed(tokens)                             # [S, E]
        for layer in range(cfg.num_layers):
            self._enter(layer)
            hs = self._rms(xs, self._lp("attn_norm", layer))
            qkv = [self._qkv(layer, hs[s], p0 + s) for s in range(S)]
            out = np.zeros((S, cfg.num_heads, cfg.head_dim), F32)
            cand_lists, last_rows, col_sums = [], [], []
            for kh in range(cfg.num_kv_heads):
                new = [Entry(p0 + s, qkv[s][1][kh], qkv[s][2][kh], 0.0) for s in range(S)]
                cands = self.kept[layer][kh] + new
                rows = []
                for s in range(S):
                    w, o = self._attend(qkv[s][0][kh * G:(kh + 1) * G], cands, p0 + s)
                    out[s, kh * G:(kh + 1) * G] = o
                    rows.append(w)                           # [G, n]
                cand_lists.append(cands)
                last_rows.append(rows[-1])
                col_sums.append(np.stack(rows))              # [S, G, n]
            xs_attn = out.reshape(S, -1)
            if self.policy in ("h2o", "h2o-head"):
                if self.policy in HEADWISE:
                    cols = [r.mean(1, dtype=F32).sum(0, dtype=F32) for r in col_sums]
                else:
                    cols = np.concatenate(col_sums, axis=1).mean(1, dtype=F32).sum(0, dtype=F32)
                    cols = [cols for _ in col_sums]
                for cands, col in zip(cand_lists, cols):
                    for c, ci in zip(cands, col):
                        c.score = F32(c.score + ci)
                avgs = cols
            else:
                avgs = self._averages(cand_lists, last_rows)
            self._apply_keep(layer, cand_lists, avgs)
            self._store_new(layer, p0)
            xs = self._residual(layer, xs, xs_attn)
        self.length += S
        return np.stack([self._logits(x) for x in xs])

    def oneshot(self, tokens) -> np.ndarray:
        """Oneshot mode (empty state only): an ordinary causal forward over the prompt,
        then each layer keeps a top-C set ranked by the last prompt token's attention
        (tova), the last C (window), the first i + last C-i (sink), or the recent
        floor(C/2) + top by column-summed attention (h2o). Returns logits [T, V]."""
        assert self.length == 0 and not any(self.kept[0])
        assert self.positions == "absolute", "oneshot has no reindex mode (docs/design.md §8)"
        cfg = self.cfg
        tokens = [int(t) for t in tokens]
        T = len(tokens)
        G = self.G
        xs = self._embed(tokens)
        for layer in range(cfg.num_layers):
            self._enter(layer)
            hs = self._rms(xs, self._lp("attn_norm", layer))
            qkv = [self._qkv(layer, hs[t], t) for t in range(T)]
            out = np.zeros((T, cfg.num_heads, cfg.head_dim), F32)
            cand_lists, last_rows, all_rows = [], [], []
            for kh in range(cfg.num_kv_heads):
                cands = [Entry(t, qkv[t][1][kh], qkv[t][2][kh], 0.0) for t in range(T)]
                rows = []
                for t in range(T):
                    w, o = self._attend(qkv[t][0][kh * G:(kh + 1) * G], cands, t)
                    out[t, kh * G:(kh + 1) * G] = o
                    rows.append(w)
                cand_lists.append(cands)
                last_rows.append(rows[-1])
                all_rows.append(np.stack(rows))              # [T, G, T]
            xs_attn = out.reshape(T, -1)
            if self.policy in ("h2o", "h2o-head"):
                if self.policy in HEADWISE:
                    cols = [r.mean(1, dtype=F32).sum(0, dtype=F32) for r in all_rows]
                else:
                    cols = np.concatenate(all_rows, axis=1).mean(1, dtype=F32).sum(0, dtype=F32)
                    cols = [cols for _ in all_rows]
                for cands, col in zip(cand_lists, cols):
                    for c, ci in zip(cands, col):
                        c.score = F32(ci)
                avgs = cols
            else:
                avgs = self._averages(cand_lists, last_rows)
            self._apply_keep(layer, cand_lists, avgs)
            self._store_new(layer, 0)
            xs = self._residual(layer, xs, xs_attn)
        self.length = T
        return np.stack([self._logits(x) for x in xs])

    def _store_new(self, layer, first):
        """The entries this call wrote (positions >= first) as the state stores them: they
        took part in this call's attention at full precision, and are read back stored."""
        for entries in self.kept[layer]:
            for e in entries:
                if e.pos >= first:
                    e.k, e.v = stored(e.k, self.state_dtype), stored(e.v, self.state_dtype)

    # -- inspection ------------------------------------------------------------------------
    def kept_positions(self, width: int | None = None):
        """[L, Hkv, width] int32: kept positions padded with -1, sorted ascending (so the
        -1 padding comes first, like `np.sort` of the implementation's `pos`). With layer
        groups: a tuple (the sliding layers' [Ls, Hkv, W - 1], the other layers' [Lg, Hkv,
        width]), each group's layers in order."""
        width = self.user_C if width is None else width
        if self.sliding:
            glob = [l for l in range(self.cfg.num_layers) if l not in self.sliding]
            groups = ((sorted(self.sliding), max(self.cfg.sliding_window - 1, 1)), (glob, width))
            return tuple(self._kept(layers, w) for layers, w in groups if layers)
        return self._kept(range(self.cfg.num_layers), width)

    def _kept(self, layers, width: int) -> np.ndarray:
        layers = list(layers)
        L, H = len(layers), self.cfg.num_kv_heads
        out = np.full((L, H, width), -1, np.int32)
        for layer in range(L):
            for h in range(H):
                ps = [e.pos for e in self.kept[layers[layer]][h]]
                assert len(ps) <= width
                out[layer, h, :len(ps)] = ps
        return np.sort(out, axis=-1)

    def kept_scores(self, width: int | None = None) -> np.ndarray:
        """[L, Hkv, width] float32 scores in the same order as `kept_positions` (0 pad)."""
        width = self.C if width is None else width
        L, H = self.cfg.num_layers, self.cfg.num_kv_heads
        out = np.zeros((L, H, width), F32)
        for layer in range(L):
            for h in range(H):
                es = sorted(self.kept[layer][h], key=lambda e: e.pos)
                out[layer, h, width - len(es):] = [e.score for e in es]
        return out


# -- convenience drivers -------------------------------------------------------------------
def reference_run(params, cfg, policy: str, capacity: int, tokens, sinks: int = 4,
                  positions: str = "absolute", state_dtype: str | None = None):
    """Exact mode over one row. Returns (logits [T, V], kept positions [T, L, Hkv, C])."""
    ref = ReferenceMSRNN(params, cfg, policy, capacity, sinks, positions, state_dtype)
    logits, kept = [], []
    for t in tokens:
        logits.append(ref.step(t))
        kept.append(ref.kept_positions())
    if isinstance(kept[0], tuple):  # layer groups: one [T, Lg, Hkv, Cg] per group
        return np.stack(logits), tuple(np.stack(k) for k in zip(*kept))
    return np.stack(logits), np.stack(kept)


def reference_nll(logits: np.ndarray, targets) -> np.ndarray:
    """[T] negative log-likelihood of `targets` under `logits` [T, V]."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), np.asarray(targets)]


def reference_chunked(params, cfg, policy: str, capacity: int, tokens, chunk: int, sinks: int = 4,
                      positions: str = "absolute", state_dtype: str | None = None):
    """Chunked mode over one row (the last chunk may be shorter).

    Returns (logits [T, V], kept positions after every chunk [n_chunks, L, Hkv, C], ref)."""
    ref = ReferenceMSRNN(params, cfg, policy, capacity, sinks, positions, state_dtype)
    logits, kept = [], []
    tokens = list(tokens)
    for start in range(0, len(tokens), chunk):
        logits.append(ref.chunk(tokens[start:start + chunk]))
        kept.append(ref.kept_positions())
    if isinstance(kept[0], tuple):
        return np.concatenate(logits), tuple(np.stack(k) for k in zip(*kept)), ref
    return np.concatenate(logits), np.stack(kept), ref


def reference_oneshot(params, cfg, policy: str, capacity: int, tokens, sinks: int = 4,
                      state_dtype: str | None = None):
    """Oneshot mode over one row. Returns (logits [T, V], kept [L, Hkv, C], ref)."""
    ref = ReferenceMSRNN(params, cfg, policy, capacity, sinks, state_dtype=state_dtype)
    logits = ref.oneshot(tokens)
    return logits, ref.kept_positions(), ref


def reference_forward(params, cfg, tokens) -> np.ndarray:
    """The ordinary causal transformer (full policy, capacity T). Logits [T, V]."""
    return reference_run(params, cfg, "full", len(tokens), tokens)[0]
