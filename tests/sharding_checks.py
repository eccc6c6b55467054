"""The mesh checks of tests/test_sharding.py, run in one subprocess with 8 CPU devices
(the rest of the suite keeps one device). Each check compares a sharded run with the
one-device run of the same inputs; the results go to a JSON file as {name: detail}.

    python tests/sharding_checks.py OUT.json          (XLA_FLAGS is set here)
    python tests/sharding_checks.py --worker I PORT FOLDER OUT.json   (one of two processes)
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stderr
from pathlib import Path

if sys.argv[1:2] == ["--worker"]:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
else:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"  # CPU devices also on a GPU machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the worktree's msrnn_jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from msrnn_jax.fast import sharding  # noqa: E402
from msrnn_jax.run.api import Model, load_model  # noqa: E402
from msrnn_jax.errors import InvalidArgument  # noqa: E402
from msrnn_jax.run.evaluate import run_policy  # noqa: E402
from msrnn_jax.core.parallel import chunk_step, prefill_oneshot
from msrnn_jax.core.step import scan  # noqa: E402
from msrnn_jax.core.policies import PerRow, make_policy  # noqa: E402
from msrnn_jax.core.state import State  # noqa: E402

POLICIES = ("full", "window", "sink", "tova", "tova-head", "h2o", "h2o-head")
BOUNDED = POLICIES[1:]
B, T, C, S = 6, 20, 8, 5  # rows, tokens, capacity, chunk


def tiny(family: str, **overrides):
    """(cfg, host params) of a tiny random HF model of `family` (tests/hf_models.py)."""
    from hf_models import make_hf_model, save_hf_model

    from msrnn_jax.convert.hf import load_hf_folder

    folder = save_hf_model(make_hf_model(family, **overrides), tempfile.mkdtemp())
    return load_hf_folder(folder)


def mesh_of(D, M):
    return sharding.make_mesh({"data": D, "model": M}, jax.devices()[: D * M])


def diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def same(a, b) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def run_exact(cfg, params, state, tokens):
    pol = PerRow(policies=tuple(make_policy(n) for n in BOUNDED))  # all six, one per row
    logits, st, pos = scan(params, cfg, pol, state, tokens, emit="logits+pos")
    return logits, st.pos, pos


def check_exact(cfg, host, tokens, meshes):
    """Every bounded policy side by side (PerRow), exact step: logits and the kept
    positions after every step, sharded vs one device."""
    ref = run_exact(cfg, jax.tree.map(jnp.asarray, host), State.init(cfg, B, C), jnp.asarray(tokens))
    out = {}
    for D, M in meshes:
        mesh = mesh_of(D, M)
        params = sharding.shard_params(host, mesh)
        with sharding.use(mesh):
            got = run_exact(cfg, params, sharding.init_state(cfg, B, C, jnp.float32, mesh),
                            sharding.put_rows(tokens, mesh))
        out[f"{D}x{M}"] = {"logits": diff(got[0], ref[0]), "pos": same(got[2], ref[2]),
                           "final_pos": same(got[1], ref[1])}
    return out


def check_prefills(cfg, host, tokens, D, M):
    """oneshot and chunked prefill for every policy at one mesh, vs one device."""
    mesh = mesh_of(D, M)
    with sharding.use(mesh):
        return _check_prefills(cfg, host, tokens, mesh)


def _check_prefills(cfg, host, tokens, mesh):
    sp, p1 = sharding.shard_params(host, mesh), jax.tree.map(jnp.asarray, host)
    lengths = np.full((B,), T, np.int32)
    lengths[1] = T - 7  # a ragged row
    out = {}
    for name in POLICIES:
        pol = make_policy(name)
        cap = T if name == "full" else C
        l1, s1 = prefill_oneshot(p1, cfg, pol, cap, jnp.asarray(tokens), jnp.asarray(lengths))
        l2, s2 = prefill_oneshot(sp, cfg, pol, cap, sharding.put_rows(tokens, mesh), sharding.put_rows(lengths, mesh))
        out[f"oneshot/{name}"] = {"logits": diff(l1, l2), "pos": same(s1.pos, s2.pos)}
        st1, st2 = State.init(cfg, B, cap), sharding.init_state(cfg, B, cap, jnp.float32, mesh)
        ok, worst = True, 0.0
        for c in range(T // S):
            x = tokens[:, c * S:(c + 1) * S]
            l1, st1 = chunk_step(p1, cfg, pol, st1, jnp.asarray(x))
            l2, st2 = chunk_step(sp, cfg, pol, st2, sharding.put_rows(x, mesh))
            worst, ok = max(worst, diff(l1, l2)), ok and same(st1.pos, st2.pos)
        out[f"chunked/{name}"] = {"logits": worst, "pos": ok,
                                  "state_spec": str(st2.keys.sharding.spec)}
    return out


def check_sums(cfg, host):
    """What a model=2 mesh compiles: every float all-reduce (a sum across devices) in the
    step, the layer-major prefill and a chunk step, by the op it comes from. Only the
    embedding lookup may sum (one row and zeros: exact); with `sharding.use` left out,
    the projections' sums are split too (the check can fail)."""
    import re

    from msrnn_jax.core.parallel import chunk_step

    from msrnn_jax.fast.layer_major import layer_major

    from msrnn_jax.core.step import step
    mesh = mesh_of(2, 2)
    params = sharding.shard_params(host, mesh)
    tok = sharding.put_rows(np.zeros((2, 4), np.int32), mesh)
    out = {}

    def sums(fn, *args):
        txt = jax.jit(fn).lower(params, sharding.init_state(cfg, 2, C, jnp.float32, mesh), *args).compile().as_text()
        return sorted({m.group(1).split("/")[-1] for m in re.finditer(
            r"= f32\[[^\]]*\][^ ]* all-reduce(?:-start)?\(.*?op_name=\"([^\"]*)\"", txt)})

    for name in ("tova", "h2o", "tova-head"):
        pol = make_policy(name)
        with sharding.use(mesh):
            out[f"step/{name}"] = sums(lambda p, s, t: step(p, cfg, pol, s, t)[0], tok[:, 0])
            out[f"layer_major/{name}"] = sums(lambda p, s, t: layer_major(p, cfg, pol, s, t, t >= 0)[0], tok)
            out[f"chunk/{name}"] = sums(lambda p, s, t: chunk_step(p, cfg, pol, s, t)[1].pos, tok)
        out[f"no_mesh_context/{name}"] = sums(lambda p, s, t: step(p, cfg, pol, s, t)[0], tok[:, 0])
    return out


def check_api(cfg, host):
    """The Model API with a mesh: ppl (3 rows padded to 4 over data=2) and greedy
    generate (ragged prompts) equal the one-device model; the decode loop compiles once."""
    from msrnn_jax.run import decoding
    from msrnn_jax.run.api import generate

    rng = np.random.default_rng(3)
    rows = rng.integers(0, cfg.vocab_size, (3, 40)).astype(np.int32)
    one = Model(cfg, jax.tree.map(jnp.asarray, host))
    mesh = mesh_of(2, 2)
    sharded = Model(cfg, sharding.shard_params(host, mesh), mesh=mesh)
    out = {}
    for name in ("full", "tova"):
        cap = None if name == "full" else 12
        r1 = run_policy(one, name, cap, rows, steps_per_call=16)
        r2 = run_policy(sharded, name, cap, rows, steps_per_call=16)
        out[f"ppl/{name}"] = {"nll": diff(r1.nll, r2.nll), "pos": same(r1.state.pos, r2.state.pos),
                              "rows": int(r2.nll.shape[0])}
    r1 = run_policy(one, "tova", 12, rows, steps_per_call=16, state_dtype="int8")
    r2 = run_policy(sharded, "tova", 12, rows, steps_per_call=16, state_dtype="int8")
    out["ppl/tova-int8"] = {"nll": diff(r1.nll, r2.nll), "pos": same(r1.state.pos, r2.state.pos),
                            "rows": int(r2.nll.shape[0]), "dtype": r2.state.dtype,
                            "scale_spec": str(r2.state.keys.scale.sharding.spec),
                            "pos_spec": str(r2.state.pos.sharding.spec),
                            "codes_equal": float(np.mean(np.asarray(r1.state.keys.data)
                                                         == sharding.to_host(r2.state.keys.data)))}
    prompts = [list(rows[0, :9]), list(rows[1, :15]), list(rows[2, :4])]
    g1 = generate(one, prompts, 40, policy="tova", capacity=16, steps_per_call=8)
    compiles = _CompileCounter("decode_rows")
    g2 = generate(sharded, prompts, 40, policy="tova", capacity=16, steps_per_call=8)
    first = compiles.n
    g3 = generate(sharded, prompts, 40, policy="tova", capacity=16, steps_per_call=8)
    compiles.close()
    out["generate"] = {"tokens": g1.tokens == g2.tokens, "again": g3.tokens == g2.tokens,
                       "calls": -(-40 // 8), "compiles": first, "recompiles": compiles.n - first,
                       "pos": same(g1.state.pos, g2.state.pos), "rows": int(g2.state.batch)}
    return out


def check_groups(cfg, host, tokens):
    """A model with layer groups (gemma3: sliding and global layers) on a 2x2 mesh: the exact
    step with every bounded policy side by side, oneshot and chunked prefill, and the API's
    perplexity and greedy generation equal one device, group by group."""
    from msrnn_jax.core.state import init_state
    from msrnn_jax.run.api import generate

    p1 = jax.tree.map(jnp.asarray, host)
    mesh = mesh_of(2, 2)
    sp = sharding.shard_params(host, mesh)
    groups_same = lambda a, b: all(same(x, y) for x, y in zip(a.pos, b.pos))  # noqa: E731
    out = {}
    ref = run_exact(cfg, p1, init_state(cfg, B, C), jnp.asarray(tokens))
    with sharding.use(mesh):
        got = run_exact(cfg, sp, sharding.init_state(cfg, B, C, jnp.float32, mesh), sharding.put_rows(tokens, mesh))
        out["exact"] = {"logits": diff(got[0], ref[0]), "pos": all(same(a, b) for a, b in zip(got[2], ref[2])),
                        "final_pos": all(same(a, b) for a, b in zip(got[1], ref[1])),
                        "groups": len(got[1]), "spec": str(got[1][0].sharding.spec)}
        lengths = np.full((B,), T, np.int32)
        lengths[1] = T - 7
        pol = make_policy("tova")
        l1, s1 = prefill_oneshot(p1, cfg, pol, C, jnp.asarray(tokens), jnp.asarray(lengths))
        l2, s2 = prefill_oneshot(sp, cfg, pol, C, sharding.put_rows(tokens, mesh), sharding.put_rows(lengths, mesh))
        out["oneshot"] = {"logits": diff(l1, l2), "pos": groups_same(s1, s2)}
        st1, st2 = init_state(cfg, B, C), sharding.init_state(cfg, B, C, jnp.float32, mesh)
        ok, worst = True, 0.0
        for c in range(T // S):
            x = tokens[:, c * S:(c + 1) * S]
            l1, st1 = chunk_step(p1, cfg, pol, st1, jnp.asarray(x))
            l2, st2 = chunk_step(sp, cfg, pol, st2, sharding.put_rows(x, mesh))
            worst, ok = max(worst, diff(l1, l2)), ok and groups_same(st1, st2)
        out["chunked"] = {"logits": worst, "pos": ok}
    one, sharded = Model(cfg, p1), Model(cfg, sp, mesh=mesh)
    r1 = run_policy(one, "tova", 8, tokens[:3], steps_per_call=16)
    r2 = run_policy(sharded, "tova", 8, tokens[:3], steps_per_call=16)
    out["ppl"] = {"nll": diff(r1.nll, r2.nll), "pos": groups_same(r1.state, r2.state)}
    prompts = [list(tokens[0, :9]), list(tokens[1, :15]), list(tokens[2, :4])]
    g1 = generate(one, prompts, 12, policy="tova", capacity=8, steps_per_call=4)
    g2 = generate(sharded, prompts, 12, policy="tova", capacity=8, steps_per_call=4)
    out["generate"] = {"tokens": g1.tokens == g2.tokens, "pos": groups_same(g1.state, g2.state)}
    return out


def check_engine(cfg, host):
    """The serving engine on a 2x2 mesh: greedy outputs of six concurrent requests over
    four rows equal one-device `generate` of each prompt alone (exact and chunked
    prefill), nothing compiles while serving, and the state stays split."""
    from msrnn_jax.run.api import generate
    from msrnn_jax.serve.engine import Engine

    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 11, 3, 17, 8, 2)]
    one = Model(cfg, jax.tree.map(jnp.asarray, host))
    mesh = mesh_of(2, 2)
    sharded = Model(cfg, sharding.shard_params(host, mesh), mesh=mesh)
    out = {}
    for prefill, chunk in (("exact", None), ("chunked", 4)):
        want = [np.asarray(generate(one, [p], 12, policy="tova", capacity=8, prefill=prefill, chunk=chunk,
                                    steps_per_call=4).tokens[0]).tolist() for p in prompts]
        eng = Engine(sharded, "tova", 8, max_batch=4, max_queue=8, prefill=prefill, chunk=chunk,
                     steps_per_call=4, log_requests=False).start()
        eng.ready.wait(600)
        if eng.error is not None:
            raise eng.error
        before = eng.compiled()
        reqs = [eng.submit(p, 12, temperature=0) for p in prompts]
        got = [list(r.result(600).tokens) for r in reqs]
        out[prefill] = {"tokens": got == want, "want": want, "got": got, "compiled": before,
                        "after": eng.compiled(), "state_spec": str(eng.state.keys.sharding.spec)}
        eng.stop()
    return out


class _CompileCounter(logging.Handler):
    """Counts XLA compilations of one jitted function (jax_log_compiles messages)."""

    def __init__(self, name):
        super().__init__()
        self.name, self.n = name, 0
        jax.config.update("jax_log_compiles", True)
        logging.getLogger("jax").addHandler(self)

    def emit(self, record):
        if f"Compiling jit({self.name})" in record.getMessage():
            self.n += 1

    def close(self):
        logging.getLogger("jax").removeHandler(self)
        jax.config.update("jax_log_compiles", False)
        super().close()


def check_loading(family="llama-gqa"):
    """load_model(mesh=...) from a HF folder (placed shard by shard) and from a converted
    orbax folder (restored into the shardings): every leaf carries its NamedSharding, each
    device holds only its slice, and the values equal the host params."""
    from hf_models import save_tiny_model

    from msrnn_jax.convert.checkpoint import save_converted
    from msrnn_jax.convert.hf import load_hf_folder

    folder = save_tiny_model(tempfile.mkdtemp(), family)
    cfg, host = load_hf_folder(folder)
    conv = Path(tempfile.mkdtemp()) / "conv"
    save_converted(conv, cfg, host, None, source="test")
    out = {}
    for what, spec in (("hf", folder), ("orbax", str(conv))):
        m = load_model(spec, layers="stacked", mesh="data=4,model=2")
        want = sharding.param_shardings(m.params, m.mesh)
        ok_sharding = all(a.sharding == s for a, s in zip(jax.tree.leaves(m.params), jax.tree.leaves(want)))
        ok_slices = all(all(sh.data.shape == s.shard_shape(a.shape) for sh in a.addressable_shards)
                        for a, s in zip(jax.tree.leaves(m.params), jax.tree.leaves(want)))
        vals = max(diff(a, b) for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(host)))
        out[what] = {"sharding": ok_sharding, "slices": ok_slices, "values": vals,
                     "wq_spec": str(m.params["layers"]["wq"].sharding.spec)}
    # the fused layout (q|k|v, gate|up joined) on a mesh whose model axis is 1: rows over
    # data=8, the joined matrices whole on every device; the same perplexity and kept
    # positions as one device. Refused where model > 1 splits the matrices by heads.
    ids = np.random.default_rng(11).integers(0, cfg.vocab_size, (3, 40)).astype(np.int32)
    one = run_policy(Model(cfg, jax.tree.map(jnp.asarray, host)), "tova", 12, ids, steps_per_call=16)
    for what, spec in (("fused_hf", folder), ("fused_orbax", str(conv))):
        m = load_model(spec, layers="fused", mesh="data=8,model=1")
        lp = m.params["layers"][0]
        got = run_policy(m, "tova", 12, ids, steps_per_call=16)
        out[what] = {"keys": sorted(lp), "wqkv_spec": str(lp["wqkv"].sharding.spec),
                     "devices": len(lp["wqkv"].sharding.device_set), "nll": diff(one.nll, got.nll),
                     "pos": same(one.state.pos, got.state.pos), "rows": int(got.nll.shape[0])}
    try:
        load_model(folder, layers="fused", mesh="data=4,model=2")
        out["fused_model2"] = "loaded"
    except InvalidArgument as e:
        out["fused_model2"] = str(e)
    return out


def check_errors():
    """Bad meshes, one line each, through the command line's error handling."""
    from msrnn_jax import cli

    three = str(Path(tempfile.mkdtemp()) / "three")
    from hf_models import save_tiny_model

    save_tiny_model(three, "llama-gqa", num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    text = Path(tempfile.mkdtemp()) / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = {}
    for name, mesh in (("too_large", "data=4,model=4"), ("heads", "data=4,model=2"),
                       ("not_all", "data=2,model=2"), ("bad_axis", "rows=2")):
        err = io.StringIO()
        with redirect_stderr(err):
            rc = cli.main(["ppl", str(text), "--model", three, "--policy", "tova", "--capacity", "8",
                           "--tokens", "32", "--mesh", mesh])
        out[name] = {"rc": rc, "stderr": err.getvalue()}
    err = io.StringIO()  # serve: its rows split over data, refused before the server starts
    with redirect_stderr(err):
        rc = cli.main(["serve", "--model", three, "--mesh", "data=8", "--max-batch", "4", "--port", "0"])
    out["serve_rows"] = {"rc": rc, "stderr": err.getvalue()}
    err = io.StringIO()  # serve: the Pallas kernels are not partitioned, refused under a mesh
    with redirect_stderr(err):
        rc = cli.main(["serve", "--model", three, "--mesh", "data=8", "--max-batch", "8", "--attention", "pallas",
                       "--port", "0"])
    out["serve_pallas"] = {"rc": rc, "stderr": err.getvalue()}
    # model=3 divides 3 KV heads: a 2x3 mesh over 6 of the devices runs and matches one device
    cfg, host = __import__("msrnn_jax.convert.hf", fromlist=["x"]).load_hf_folder(three)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 33))
    one = run_policy(Model(cfg, jax.tree.map(jnp.asarray, host)), "tova", 8, ids)
    mesh = mesh_of(2, 3)
    six = run_policy(Model(cfg, sharding.shard_params(host, mesh), mesh=mesh), "tova", 8, ids)
    out["model3"] = {"nll": diff(one.nll, six.nll), "pos": same(one.state.pos, six.state.pos)}
    return out


def main_checks(path):
    results = {}
    rng = np.random.default_rng(0)

    def run(name, fn, *a):
        t0 = time.perf_counter()
        try:
            results[name] = fn(*a)
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        except Exception:  # noqa: BLE001  reported to the test, which fails with it
            results[name] = {"error": traceback.format_exc()}
        Path(path).write_text(json.dumps(results))

    families = {"llama-mha": ({}, [(1, 2), (2, 1), (2, 2), (2, 4)]),
                "llama-gqa": ({}, [(2, 2)]),
                "mistral": ({"num_key_value_heads": 2}, [(2, 2)]),  # its 1 KV head would allow only model=1
                "qwen2": ({}, [(2, 2)])}
    for fam, (over, meshes) in families.items():
        cfg, host = tiny(fam, **over)
        tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
        run(f"exact/{fam}", check_exact, cfg, host, tokens, meshes)
        if fam == "llama-gqa":
            run(f"prefill/{fam}", check_prefills, cfg, host, tokens, 2, 2)
            run("sums", check_sums, cfg, host)
            run("api", check_api, cfg, host)
            run("engine", check_engine, cfg, host)
    cfg, host = tiny("gemma3")
    run("groups", check_groups, cfg, host, rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32))
    run("loading", check_loading)
    run("errors", check_errors)


def worker(rank, port, folder, out):
    """One of two processes: 2 CPU devices each, one 2x2 mesh across both."""
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                               initialization_timeout=60)
    ids = np.load(Path(folder) / "ids.npy")
    m = load_model(folder, layers="stacked", mesh="data=2,model=2")
    run = run_policy(m, "tova", 12, ids, steps_per_call=16)
    if rank == 0:
        Path(out).write_text(json.dumps({"nll": run.nll.tolist(), "devices": jax.device_count(),
                                         "processes": jax.process_count(),
                                         "pos": sharding.to_host(run.state.pos).tolist()}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main_checks(sys.argv[1])
