"""Keep a state: save it with orbax, restore it, and refuse one from another model.

A saved state is a folder with `state.json` (which model, policy, capacity, dtype)
and the arrays under `arrays/`, written atomically like converted checkpoints. A state of
layer groups (`Groups`, docs/design.md §12) keeps each group's arrays under its index; its
`capacity` is the global layers' (the user's), `capacities` every group's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..core.policies import Policy, policy_name
from ..core.state import QUANTIZED, Groups, Quantized, State
from ..errors import InvalidArgument, MsrnnError
from .files import temp_folder, temporary

FORMAT = "msrnn-state/1"


def model_fingerprint(model) -> str:
    """Identifies a model's shapes and weights cheaply (config + a few parameter rows)."""
    h = hashlib.sha256(model.cfg.to_json().encode())
    for a in (model.params["embed"][:4], model.params["final_norm"]):
        h.update(np.asarray(a, np.float32).tobytes())
    return h.hexdigest()[:16]


def check_state_folder(path) -> Path:
    """The absolute folder a state may be saved to (checked before any work): new, or an
    empty folder, in a folder that exists or can be made."""
    path = Path(path).absolute()
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise MsrnnError(f"{path} already exists; choose a new folder for the state")
    return path


def _arrays(state) -> dict:
    if isinstance(state, Groups):
        return {"groups": {str(g): _state_arrays(s) for g, s in enumerate(state.states)}}
    return _state_arrays(state)


def _state_arrays(state: State) -> dict:
    """The state as numpy arrays for orbax; 8-bit slots as {"data": raw bytes (uint8),
    "scale"}, which every checkpoint backend stores."""
    def plain(v):
        if isinstance(v, Quantized):
            return {"data": np.asarray(v.data).view(np.uint8), "scale": np.asarray(v.scale)}
        return np.asarray(v)

    return {k: plain(v) for k, v in state.as_dict().items()}


def _from_arrays(arrays: dict, dtype: str) -> State:
    def field(v):
        if isinstance(v, dict):
            qtype = QUANTIZED[dtype][0]
            return Quantized(jnp.asarray(np.asarray(v["data"]).view(qtype)), jnp.asarray(v["scale"]))
        return jnp.asarray(v)

    return State(**{k: field(arrays[k]) for k in State.field_names()})


def save_state(path, state: State, model, policy: Policy) -> None:
    import orbax.checkpoint as ocp

    path = check_state_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary(temp_folder(path)) as tmp:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "arrays", _arrays(state))
        meta = {"format": FORMAT, "model": model_fingerprint(model), "policy": policy_name(policy),
                "capacity": state.capacity, "batch": state.batch, "dtype": state.dtype,
                "length": [int(x) for x in np.asarray(state.length)]}
        if isinstance(state, Groups):  # the user's capacity is the global layers'
            g = state.bounded_group
            meta.update(capacity=None if g is None else state.capacity[g], capacities=list(state.capacity),
                        windows=list(state.windows))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)


def state_meta(path) -> dict:
    """What `state.json` of a saved state says (model, policy, capacity, batch, dtype,
    length), read without the model, so that a command can check it before loading one."""
    path = Path(path).absolute()
    meta_file = path / "state.json"
    if not meta_file.is_file():
        raise MsrnnError(f"not a saved state: {path} (no state.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise MsrnnError(f"corrupt saved state {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = meta.get("format") if isinstance(meta, dict) else None
        raise MsrnnError(f"not a saved state: {path} (format {what!r})")
    return meta


def load_state(path, model, policy: Policy | None = None, batch: int | None = None,
               capacity: int | None = None) -> State:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = state_meta(path)
    if meta["model"] != model_fingerprint(model):
        raise InvalidArgument(f"the state in {path} was made by another model than {model.source}")
    if capacity is not None and meta["capacity"] != capacity:
        raise InvalidArgument(f"the state in {path} has capacity {meta['capacity']}, not {capacity}")
    if batch is not None and meta["batch"] != batch:
        raise InvalidArgument(f"the state in {path} has {meta['batch']} rows, not {batch}")
    if policy is not None and meta["policy"] != policy_name(policy) and policy.bounded:
        raise InvalidArgument(f"the state in {path} was made with policy {meta['policy']}, "
                         f"not {policy_name(policy)}")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            arrays = ckpt.restore(path / "arrays")
        if model.cfg.grouped:
            state = Groups(tuple(_from_arrays(arrays["groups"][str(g)], meta.get("dtype", ""))
                                 for g in range(len(model.cfg.layer_groups))),
                           tuple(w for _, w in model.cfg.layer_groups))
        else:
            state = _from_arrays(arrays, meta.get("dtype", ""))
    except Exception as e:  # noqa: BLE001
        raise MsrnnError(f"corrupt saved state {path}: {type(e).__name__}") from None
    cfg = model.cfg
    if isinstance(state, Groups):
        caps = meta.get("capacities") or []
        for g, ((layers, _), st) in enumerate(zip(cfg.layer_groups, state.states)):
            want = (len(layers), meta["batch"], cfg.num_kv_heads, caps[g] if g < len(caps) else -1, cfg.head_dim)
            if st.keys.shape != want:
                raise MsrnnError(f"corrupt saved state {path}: group {g}'s keys have shape {st.keys.shape}, "
                                 f"expected {want}")
        return state
    want = (cfg.num_layers, meta["batch"], cfg.num_kv_heads, meta["capacity"], cfg.head_dim)
    if state.keys.shape != want:
        raise MsrnnError(f"corrupt saved state {path}: keys have shape {state.keys.shape}, expected {want}")
    return state
