"""Weight layouts: how a model's params are arranged, never what they compute. `project`
and `mlp` (`core.layers`) read every layout; docs/performance.md gives the measured reasons.

- stacked: every layer's arrays on a leading [L, ...] axis, driven by `lax.scan` (fast
  compiles; the CPU default);
- per-layer (`split_layers`): a list of per-layer dicts, the layer loop unrolled so that
  each weight is read where it lies (the accelerator default);
- fused (`fuse_projections`): q|k|v and gate|up joined into one matrix each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gateup": ("w_gate", "w_up")}


def fuse_projections(params):
    """The same parameters with each layer's q, k, v projections (and biases) joined into
    one matrix `wqkv` and the MLP's gate and up into `w_gateup`: fewer, larger products
    (one read of h per group). `project` and `mlp` read either layout. A mesh with a
    model axis over 1 splits the separate matrices by heads and columns, so there a model
    keeps them apart; where the model axis is 1 the joined ones are whole on every device."""
    def fuse(lp):
        lp = dict(lp)
        for name, parts in FUSED.items():
            if all(p in lp for p in parts):
                arrays = [lp.pop(p) for p in parts]
                xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp  # host stays host
                lp[name] = xp.concatenate(arrays, -1)
        return lp

    layers = params["layers"]
    fused = [fuse(lp) for lp in layers] if isinstance(layers, (list, tuple)) else fuse(layers)
    return {**params, "layers": fused}


def split_layers(params):
    """The same parameters with `layers` as a list of per-layer dicts. `step` and the
    parallel paths (`forward_parallel`, `chunk_step`, `layer_major`) then unroll the layers
    and read each weight where it lies (the fast layout on GPU, see `attention` and
    `scan_layers`)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a: a[i], layers) for i in range(n)]}


def scan_layers(layer, x, params, *per_layer):
    """`lax.scan(layer, x, (layers, *per_layer))` over the model's layers: layer(x, (lp,
    *slices)) -> (x, out), the outs stacked on a leading axis. With per-layer params
    (`split_layers`) the loop is unrolled instead and each weight is read where it lies;
    restacking them inside the program copied every weight once per call (and took as
    much memory again), for each chunked prefill piece."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return jax.lax.scan(layer, x, (layers,) + per_layer)
    outs = []
    for l, lp in enumerate(layers):
        x, out = layer(x, (lp,) + jax.tree.map(lambda a: a[l], per_layer))
        outs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def stacked_layers(params):
    """`params["layers"]` stacked on a leading axis (undoes `split_layers`)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return layers
