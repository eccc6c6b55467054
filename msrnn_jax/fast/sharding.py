"""A `data` x `model` device mesh (docs/design.md §9), with maxtext-style logical axes.

Every array dimension has a *logical* name, and one table (`RULES`) maps each name to a
mesh axis (or to none: replicated). Changing what is split is a change to that table.

    logical     mesh axis   what it is
    batch       data        state rows, token rows (padded to a multiple of D)
    heads       model       query heads: wq by output column, bq
    kv_heads    model       KV heads: wk, wv by output column, bk, bv; the state's Hkv axis
    mlp         model       MLP columns: w_gate, w_up by column
    out         model       the output columns of wo and w_down
    heads_in    -           wo's input rows: the attention output, whole on every device
    mlp_in      -           w_down's input rows: the MLP's hidden activations, whole
    vocab       model       embed by row, lm_head by column (the largest matrix at decode)
    embed       -           the hidden size E: replicated (norms, the residual stream)
    layers, slots, head_dim -   replicated
    experts     -           the expert axis of the routed MLPs (qwen3_moe, mixtral)
    joined      -           wqkv, bqkv, w_gateup of the fused layout (`fast.layouts.fuse_projections`):
                            replicated, so that layout loads only where the model axis is 1

Heads must divide by M (a head is never split; a message says so otherwise). A `mlp` or
`vocab` dimension that M does not divide is replicated instead.

The sharded step is the ordinary jitted step: params and state are committed to
`NamedSharding`s and XLA's SPMD partitioner splits every dot_general by heads and rows.

No sum is ever split across devices, so that a mesh keeps the one-device kept positions
(a TOVA choice between two nearly equal weights flips on a last-bit difference; a sum
split over M devices is rounded differently). Under `use(mesh)` the model calls
`whole(x)` at the three places where a sum would cross the `model` axis: the attention
output before wo and the MLP's hidden activations before w_down (both are gathered, and
wo and w_down are split by output column instead of by input row), the residual stream
after each of them, and the attention weights before a layer-wise policy averages them
over the heads. What travels is activations ([B, Hq*D], [B, F], [B, E], [B, Hkv, C+1]
per layer and token), never weights. The Pallas kernels
are custom calls, which the partitioner does not split (it would gather the whole state
onto every device), so under a mesh the step uses einsum (`check_impl`).

Loading places each weight shard by shard (`jax.make_array_from_callback` per leaf; a
converted orbax folder restores straight into the shardings): the whole model never sits
on one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..config import ModelConfig
from ..core.state import Groups, Quantized, State, check_state_dtype
from ..errors import InvalidArgument, check_int

AXES = ("data", "model")

# logical name -> mesh axis (None: replicated). The one table.
RULES = {
    "batch": "data",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "out": "model",
    "heads_in": None,
    "mlp_in": None,
    "vocab": "model",
    "embed": None,
    "layers": None,
    "slots": None,
    "head_dim": None,
    "joined": None,
    "experts": None,
}

# logical axes of each parameter (per layer; a stacked layout adds "layers" in front)
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
}
LAYER_AXES = {
    "attn_norm": ("embed",), "mlp_norm": ("embed",),
    "wq": ("embed", "heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
    "bq": ("heads",), "bk": ("kv_heads",), "bv": ("kv_heads",),
    "wo": ("heads_in", "out"),
    "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp_in", "out"),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "post_attn_norm": ("embed",), "post_mlp_norm": ("embed",),  # gemma3's sandwich norms
    # routed experts: each expert's MLP columns split as w_gate's; the router and the
    # expert axis whole on every device (a token's experts are gathered where it is)
    "router": ("embed", "experts"), "experts_gate": ("experts", "embed", "mlp"),
    "experts_up": ("experts", "embed", "mlp"), "experts_down": ("experts", "mlp_in", "out"),
    # `fast.layouts.fuse_projections`: q|k|v and gate|up side by side are never split by heads or
    # columns, so the fused layout is only loaded on a mesh whose model axis is 1
    "wqkv": ("embed", "joined"), "bqkv": ("joined",), "w_gateup": ("embed", "joined"),
}
STATE_AXES = {
    "keys": ("layers", "batch", "kv_heads", "slots", "head_dim"),
    "values": ("layers", "batch", "kv_heads", "slots", "head_dim"),
    "pos": ("layers", "batch", "kv_heads", "slots"),
    "score": ("layers", "batch", "kv_heads", "slots"),
    "length": ("batch",),
}


# -- the mesh ----------------------------------------------------------------------------
def use(mesh: Mesh | None):
    """The context a computation on `mesh` runs (and is traced) in: `jax.set_mesh`, so
    that `whole` knows the mesh; a no-op context for None."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def within_mesh(fn):
    """Run `fn(..., mesh=...)` under `use(mesh)` (its `mesh` argument, None: no mesh)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use(sig.bind_partial(*args, **kwargs).arguments.get("mesh")):
            return fn(*args, **kwargs)

    return wrapped


def whole(x, batch_axis: int | None = 0):
    """x constrained to be whole on every device of the `model` axis (rows, at
    `batch_axis`, stay split over `data`): where the model would otherwise sum across
    devices (module docstring). Outside `use(mesh)`, x itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "model" not in mesh.axis_names:
        return x
    spec = [None] * x.ndim
    if batch_axis is not None:
        spec[batch_axis] = "data"
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))



def parse_mesh(spec: str | dict | None) -> dict | None:
    """"data=D,model=M" (either may be left out: 1) -> {"data": D, "model": M}."""
    if spec is None or isinstance(spec, Mesh):
        return spec
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            name, eq, value = part.partition("=")
            if not eq:
                raise InvalidArgument(f"mesh must look like data=D,model=M, got {spec!r}", "mesh")
            items.append((name.strip().lower(), value.strip()))
    sizes = {"data": 1, "model": 1}
    for name, value in items:
        if name not in sizes:
            raise InvalidArgument(f"unknown mesh axis {name!r} (the axes are data and model)", "mesh")
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise InvalidArgument(f"mesh {name} must be an integer, got {value!r}", "mesh") from None
        sizes[name] = check_int("mesh", value)
    return sizes


def make_mesh(spec, devices: Sequence | None = None) -> Mesh:
    """A Mesh of `spec` ("data=D,model=M", a dict, or a Mesh returned as it is) over
    `devices` (default: every device of every process). D x M must equal their number."""
    if isinstance(spec, Mesh):
        return spec
    sizes = parse_mesh(spec)
    D, M = sizes["data"], sizes["model"]
    available = jax.devices()
    devices = list(available if devices is None else devices)
    if D * M > len(available):
        raise InvalidArgument(f"mesh data={D},model={M} needs {D * M} devices, but only "
                              f"{len(available)} exist ({available[0].platform})", "mesh")
    if D * M != len(devices):
        raise InvalidArgument(f"mesh data={D},model={M} has {D * M} devices, but {len(devices)} "
                              f"are in use: data x model must equal {len(devices)}", "mesh")
    return Mesh(np.asarray(devices, dtype=object).reshape(D, M), AXES)


def mesh_size(mesh: Mesh, axis: str) -> int:
    return mesh.shape[axis]


def check_model(cfg: ModelConfig, mesh: Mesh) -> None:
    """Heads are never split: M must divide the query and the KV heads."""
    M = mesh_size(mesh, "model")
    for what, n in (("KV heads", cfg.num_kv_heads), ("query heads", cfg.num_heads)):
        if n % M:
            raise InvalidArgument(f"mesh model={M} does not divide the {n} {what} of this model "
                                  f"(heads are never split; choose a model size that divides {n})",
                                  "mesh")


def check_impl(impl, mesh: Mesh | None) -> None:
    """The Pallas kernels are custom calls, which SPMD does not partition: refuse them
    under a mesh of more than one device (the sharded step uses einsum)."""
    if mesh is not None and mesh.size > 1 and getattr(impl, "attention", None) == "pallas":
        raise InvalidArgument("attention='pallas' does not run under a mesh (custom calls are not "
                              "partitioned); the sharded step uses einsum", "impl")


# -- logical axes -> shardings -----------------------------------------------------------
def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes, by `RULES`. A dimension the
    mesh axis does not divide is replicated (heads are checked beforehand)."""
    out = []
    for name, n in zip(axes, shape):
        axis = RULES.get(name) if name is not None else None
        out.append(axis if axis is not None and n % mesh_size(mesh, axis) == 0 else None)
    return PartitionSpec(*out)


def _param_axes(path, ndim: int) -> tuple:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    name = keys[-1]
    if keys[0] == "layers":
        axes = LAYER_AXES[name]
        return ("layers",) * (ndim - len(axes)) + axes  # stacked: a leading layer axis
    return PARAM_AXES[name]


def param_shardings(params, mesh: Mesh):
    """The NamedSharding of every param (any layout: stacked or split layers)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, a: NamedSharding(mesh, spec_for(_param_axes(p, len(a.shape)), a.shape, mesh)), params)


def state_specs(state_like, mesh) -> State:
    """The PartitionSpec of each State array (rows over data, KV heads over model); an
    8-bit field's scales [..., C] are split as `pos`; layer groups (`Groups`): each group's
    State alike."""
    if isinstance(state_like, Groups):
        return Groups(tuple(state_specs(s, mesh) for s in state_like.states), state_like.windows)
    d = state_like.as_dict() if isinstance(state_like, State) else state_like

    def spec(name, v):
        if isinstance(v, Quantized):
            return Quantized(spec(name, v.data), spec_for(STATE_AXES["pos"], v.scale.shape, mesh))
        return spec_for(STATE_AXES[name], v.shape, mesh)

    return State(**{k: spec(k, v) for k, v in d.items()})


def state_shardings(state_like, mesh: Mesh) -> State:
    """The NamedSharding of each State array (`state_specs`)."""
    return jax.tree.map(lambda p: NamedSharding(mesh, p), state_specs(state_like, mesh),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Token-like arrays [B, ...]: rows over data."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


# -- placing arrays ----------------------------------------------------------------------
def put(x, sharding: NamedSharding, dtype=None) -> jax.Array:
    """A host array (or anything numpy can read) onto `sharding`, one shard at a time:
    each device receives only its slice (cast there to `dtype`). Works with several
    processes, each holding the same host value."""
    if isinstance(x, jax.Array):
        return jax.device_put(x if dtype is None else x.astype(dtype), sharding)
    host = np.asarray(x)
    dt = jnp.dtype(dtype) if dtype is not None else host.dtype
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: np.asarray(host[idx]).astype(dt))


def shard_params(params, mesh: Mesh, dtype=None):
    """Params (host arrays) placed leaf by leaf and shard by shard on the mesh."""
    return jax.tree.map(lambda a, s: put(a, s, dtype), params, param_shardings(params, mesh))


def put_rows(x, mesh: Mesh) -> jax.Array:
    """Token rows [B, ...] (host) split by rows over data."""
    x = np.asarray(x)
    return put(x, batch_sharding(mesh, x.ndim))


def init_state(cfg: ModelConfig, batch: int, capacity: int, dtype, mesh: Mesh) -> State:
    """An empty State (or `Groups`, for a model with layer groups) made directly in its
    shardings (nothing is gathered anywhere)."""
    from ..core.state import init_state as empty

    check_rows(batch, mesh)
    abstract = jax.eval_shape(lambda: empty(cfg, batch, capacity, dtype))
    make = jax.jit(lambda: empty(cfg, batch, capacity, dtype),
                   out_shardings=state_shardings(abstract, mesh))
    return make()


def place_state(state: State, mesh: Mesh) -> State:
    """A State moved into the mesh's state shardings."""
    check_rows(state.batch, mesh)
    return jax.tree.map(lambda a, s: jax.device_put(a, s), state, state_shardings(state, mesh))


def place_rows(mesh: Mesh | None, *arrays):
    """Arrays [B, ...] committed to rows over data; 0-d and key arrays replicated. The
    decode loop's carry goes through this before each call, so every call sees the same
    input shardings and the loop compiles once."""
    if mesh is None:
        return arrays
    rep = NamedSharding(mesh, PartitionSpec())
    return tuple(jax.device_put(a, rep if a.ndim == 0 or jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                                else batch_sharding(mesh, a.ndim)) for a in arrays)


def replicate(mesh: Mesh, x) -> jax.Array:
    """x on every device of the mesh."""
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))


def check_rows(batch: int, mesh: Mesh) -> None:
    D = mesh_size(mesh, "data")
    if batch % D:
        raise InvalidArgument(f"{batch} rows do not split over mesh data={D}: pad the batch to a "
                              f"multiple of {D}", "mesh")


def padded_rows(batch: int, mesh: Mesh | None) -> int:
    """The batch rounded up to a multiple of D (the extra rows are inactive)."""
    D = 1 if mesh is None else mesh_size(mesh, "data")
    return -(-batch // D) * D


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array's full value on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# -- loading -----------------------------------------------------------------------------
def restore_converted(folder, mesh: Mesh, dtype=None):
    """A folder written by `msrnn convert`, restored by orbax straight into the mesh's
    shardings (each process reads only its devices' slices). -> (cfg, params, tokenizer)."""
    from pathlib import Path

    import orbax.checkpoint as ocp

    from ..convert.checkpoint import read_converted_config
    from ..errors import MsrnnError
    from ..params import param_shapes

    folder = Path(folder).absolute()
    cfg, marker = read_converted_config(folder)
    check_model(cfg, mesh)
    stored = jnp.dtype(marker.get("dtype") or "float32")
    dt = stored if dtype is None else jnp.dtype(dtype)
    shapes = param_shapes(cfg)
    is_shape = lambda x: isinstance(x, tuple)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), shapes, is_leaf=is_shape)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dt, sharding=s),
                          abstract, param_shardings(abstract, mesh))
    try:
        ckpt = ocp.StandardCheckpointer()
        try:
            params = ckpt.restore(folder / "params", target)
        finally:
            ckpt.close()
    except Exception as e:
        raise MsrnnError(f"{folder / 'params'}: cannot restore the parameters into the mesh "
                         f"({' '.join(str(e).split())[:300]})") from e
    tok = None
    if marker.get("tokenizer"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    return cfg, params, tok


# -- the memory plan ---------------------------------------------------------------------
def _shard_bytes(shape, dtype, spec: PartitionSpec, sizes: dict) -> int:
    n = 1
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        n *= dim // (sizes[axis] if axis else 1)
    return n * jnp.dtype(dtype).itemsize


class _SizesMesh:
    """Just enough of a Mesh (its axis sizes) for `spec_for`: the plan allocates nothing
    and needs no devices."""

    def __init__(self, data: int, model: int):
        self.shape = {"data": data, "model": model}


def plan_bytes(cfg: ModelConfig, data: int, model: int, batch: int, capacity: int,
               dtype=jnp.bfloat16, state_dtype=None) -> tuple[int, int]:
    """(param bytes, state bytes) per device, from `jax.eval_shape` (no allocation).
    state_dtype: how the state stores keys and values (default: `dtype`; "int8" / "fp8":
    8 bits and a float32 scale per slot)."""
    from ..params import init_params

    mesh = _SizesMesh(data, model)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))
    p = sum(_shard_bytes(a.shape, a.dtype, spec_for(_param_axes(path, len(a.shape)), a.shape, mesh), mesh.shape)
            for path, a in jax.tree_util.tree_flatten_with_path(params)[0])
    state = jax.eval_shape(lambda: State.init(cfg, batch, capacity, dtype if state_dtype is None else state_dtype))
    specs = jax.tree.leaves(state_specs(state, mesh), is_leaf=lambda x: isinstance(x, PartitionSpec))
    s = sum(_shard_bytes(v.shape, v.dtype, sp, mesh.shape) for v, sp in zip(jax.tree.leaves(state), specs))
    return p, s


def largest_batch(cfg: ModelConfig, data: int, model: int, capacity: int, budget: int,
                  dtype=jnp.bfloat16, state_dtype=None) -> int:
    """The largest batch (a multiple of `data`) whose params + state fit `budget` bytes
    per device (state bytes are linear in the batch; activations are not counted)."""
    p, s_one = plan_bytes(cfg, data, model, data, capacity, dtype, state_dtype)  # one row per data shard
    if p + s_one > budget:
        return 0
    return (budget - p) // s_one * data


PLAN_SHAPES = ("llama2-70b", "llama3-70b")  # named shapes of `config.PRESETS`


@dataclasses.dataclass
class PlanRow:
    model: str
    mesh: str
    policy: str
    capacity: int
    param_gib: float
    state_gib_per_row: float
    largest_batch: int
    state_dtype: str = "bfloat16"


def memory_plan(devices: int = 8, budget_gib: float = 80.0, capacities=(512, 1024, 2048),
                meshes=((1, 8), (2, 4)), dtype=jnp.bfloat16, shapes=PLAN_SHAPES,
                state_dtypes=("bfloat16",)) -> list[PlanRow]:
    """Per-device bytes for the named `shapes` (the 70B ones by default) on `devices`
    devices: `full` (capacity = the trained context) and `tova` at each capacity, for each
    state dtype, and the largest batch within budget."""
    from ..config import preset

    rows = []
    budget = int(budget_gib * 2**30)
    for name in shapes:
        cfg = preset(name)
        for data, model in meshes:
            if data * model != devices:
                continue
            for sd in state_dtypes:
                for policy, cap in [("full", cfg.max_position_embeddings)] + [("tova", c) for c in capacities]:
                    p, s = plan_bytes(cfg, data, model, data, cap, dtype, sd)
                    rows.append(PlanRow(name, f"data={data},model={model}", policy, cap, p / 2**30, s / 2**30,
                                        largest_batch(cfg, data, model, cap, budget, dtype, sd), sd))
    return rows


def plan_markdown(rows: Sequence[PlanRow], budget_gib: float) -> str:
    out = [f"| shape | mesh | policy | C | state | params GiB/device | state GiB/device per {{data}} rows | "
           f"largest batch in {budget_gib:g} GiB/device |",
           "|---|---|---|---|---|---|---|---|"]
    out[0] = out[0].replace("{data}", "D")
    for r in rows:
        out.append(f"| {r.model} | {r.mesh} | {r.policy} | {r.capacity} | {r.state_dtype} | {r.param_gib:.2f} | "
                   f"{r.state_gib_per_row:.4f} | {r.largest_batch} |")
    return "\n".join(out)


def main(argv=None) -> int:
    """python -m msrnn_jax.fast.sharding --plan [--budget-gib 80] [--devices 8]"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m msrnn_jax.fast.sharding")
    ap.add_argument("--plan", action="store_true", help="print the 70B memory plan (no allocation)")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--budget-gib", type=float, default=80.0)
    ap.add_argument("--capacities", default="512,1024,2048")
    ap.add_argument("--shapes", default=",".join(PLAN_SHAPES), help="named shapes (config.PRESETS)")
    ap.add_argument("--state-dtypes", default="bfloat16", help="e.g. bfloat16,int8 (fp8 takes int8's bytes)")
    a = ap.parse_args(argv)
    if not a.plan:
        ap.print_help()
        return 0
    caps = tuple(int(c) for c in a.capacities.split(","))
    meshes = tuple((d, a.devices // d) for d in (1, 2) if a.devices % d == 0)
    shapes = tuple(s.strip() for s in a.shapes.split(",") if s.strip())
    dtypes = tuple(check_state_dtype(s) for s in a.state_dtypes.split(",") if s.strip())
    print(plan_markdown(memory_plan(a.devices, a.budget_gib, caps, meshes, shapes=shapes, state_dtypes=dtypes),
                        a.budget_gib))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
