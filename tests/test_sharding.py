"""The data x model mesh (docs/design.md §9) and the precision policy.

The mesh checks need several devices: they run in one subprocess with 8 CPU devices
(tests/sharding_checks.py; the rest of the suite keeps one device), which compares each
sharded run with the one-device run of the same inputs. A two-process check starts two
`jax.distributed` processes on 127.0.0.1 (2 CPU devices each, CPU collectives) whose
sharded perplexity must equal this process's one-device result.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
CHECKS = HERE / "sharding_checks.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "checks.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(CHECKS), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text())


def _get(results, name):
    r = results.get(name)
    assert r is not None, f"check {name} did not run"
    assert "error" not in r, r["error"]
    return r


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa", "mistral", "qwen2"])
def test_exact_step_every_bounded_policy_matches_one_device(results, family):
    """The six bounded policies side by side: kept positions after every step identical,
    logits within 1e-5 (meshes 1x2, 2x1, 2x2, 2x4 for MHA; 2x2 for the others)."""
    r = _get(results, f"exact/{family}")
    meshes = [k for k in r if k != "seconds"]
    assert meshes
    for m in meshes:
        assert r[m]["pos"] and r[m]["final_pos"], (family, m)
        assert r[m]["logits"] < TOL, (family, m, r[m]["logits"])
    if family == "llama-mha":
        assert set(meshes) == {"1x2", "2x1", "2x2", "2x4"}


def test_layer_groups_on_a_mesh_match_one_device(results):
    """gemma3 (sliding and global layers, a `Groups` state) on a 2x2 mesh: every bounded
    policy's kept positions in every group after every step, prefill (oneshot, chunked),
    perplexity and greedy generation equal one device."""
    r = _get(results, "groups")
    assert r["exact"]["groups"] == 2 and r["exact"]["spec"] == "P(None, 'data', 'model')"
    assert r["exact"]["pos"] and r["exact"]["final_pos"] and r["exact"]["logits"] < TOL, r["exact"]
    for mode in ("oneshot", "chunked"):
        assert r[mode]["pos"] and r[mode]["logits"] < TOL, (mode, r[mode])
    assert r["ppl"]["pos"] and r["ppl"]["nll"] < TOL, r["ppl"]
    assert r["generate"]["tokens"] and r["generate"]["pos"], r["generate"]


def test_prefill_modes_every_policy_match_one_device(results):
    """oneshot (with a ragged row) and chunked prefill, all seven policies, mesh 2x2: the
    same kept positions, logits within 1e-5, and the state stays split (rows over data,
    KV heads over model)."""
    r = _get(results, "prefill/llama-gqa")
    for mode in ("oneshot", "chunked"):
        for pol in ("full", "window", "sink", "tova", "tova-head", "h2o", "h2o-head"):
            got = r[f"{mode}/{pol}"]
            assert got["pos"], (mode, pol)
            assert got["logits"] < TOL, (mode, pol, got["logits"])
    assert r["chunked/tova"]["state_spec"].startswith("P(None, 'data', 'model'")


def test_no_sum_is_split_across_devices(results):
    """Under a model=2 mesh the compiled step, layer-major prefill and chunk step sum across
    devices only in the embedding lookup (exact): the o and down projections and the head
    average of layer-wise policies are computed whole on one device, which is what keeps
    near-tie evictions the one-device ones (docs/design.md §9). Without the mesh context
    the same programs do split sums (so this check can tell)."""
    r = _get(results, "sums")
    for name in ("tova", "h2o", "tova-head"):
        for where in ("step", "layer_major", "chunk"):
            assert set(r[f"{where}/{name}"]) <= {"gather"}, (where, name, r[f"{where}/{name}"])
        assert set(r[f"no_mesh_context/{name}"]) - {"gather"}, name


def test_model_api_with_a_mesh(results):
    """ppl of 3 rows (padded to 4 over data=2) and greedy generate of ragged prompts equal
    the one-device model; the decode loop compiles once and never again."""
    r = _get(results, "api")
    for pol in ("full", "tova", "tova-int8"):
        # 8 bits: the split products round the keys differently in the last bit, and a key
        # at a rounding midpoint then takes the neighbouring code (a step of max/127): the
        # NLLs agree to 1e-3 instead of float rounding; the kept positions are the same
        assert r[f"ppl/{pol}"]["nll"] < (1e-3 if pol.endswith("int8") else TOL) and r[f"ppl/{pol}"]["pos"], pol
        assert r[f"ppl/{pol}"]["rows"] == 3
    # an 8-bit state splits as any other: its scales as the positions
    assert r["ppl/tova-int8"]["dtype"] == "int8" and r["ppl/tova-int8"]["codes_equal"] > 0.99
    assert r["ppl/tova-int8"]["scale_spec"] == r["ppl/tova-int8"]["pos_spec"], r["ppl/tova-int8"]
    g = r["generate"]
    assert g["tokens"] and g["again"] and g["pos"] and g["rows"] == 3
    assert g["calls"] > 1
    assert g["compiles"] == 1 and g["recompiles"] == 0, g


def test_serving_engine_with_a_mesh(results):
    """The engine behind `msrnn serve` on a 2x2 mesh: six concurrent greedy requests over
    four rows give one-device `generate`'s tokens for each prompt alone (exact and chunked
    prefill); no program compiles while serving; the state stays split (rows over data,
    KV heads over model)."""
    r = _get(results, "engine")
    for prefill in ("exact", "chunked"):
        e = r[prefill]
        assert e["tokens"], (prefill, e["want"], e["got"])
        assert all(len(t) == 12 for t in e["got"])
        assert e["after"] == e["compiled"], (e["compiled"], e["after"])  # nothing compiled while serving
        assert e["state_spec"].startswith("P(None, 'data', 'model'"), e["state_spec"]


def test_loading_places_each_shard(results):
    """From a HF folder (placed per leaf, shard by shard) and from an orbax folder
    (restored into the shardings): each leaf has the rule's NamedSharding, each device
    holds only its slice, and the values are the checkpoint's."""
    r = _get(results, "loading")
    for src in ("hf", "orbax"):
        assert r[src]["sharding"] and r[src]["slices"], src
        assert r[src]["values"] == 0.0, src
        assert r[src]["wq_spec"] == "P(None, None, 'model')"
    for src in ("fused_hf", "fused_orbax"):  # the fused layout where the model axis is 1
        f = r[src]
        assert "wqkv" in f["keys"] and "w_gateup" in f["keys"] and "wq" not in f["keys"], (src, f["keys"])
        assert f["wqkv_spec"] == "P(None, None)" and f["devices"] == 8, (src, f)
        assert f["pos"] and f["nll"] < TOL and f["rows"] == 3, (src, f)
    assert "model=2" in r["fused_model2"] and "use split" in r["fused_model2"], r["fused_model2"]


def test_bad_meshes_are_one_line_errors(results):
    r = _get(results, "errors")
    want = {"too_large": "needs 16 devices, but only 8 exist",
            "heads": "model=2 does not divide the 3 KV heads",
            "not_all": "data x model must equal 8",
            "bad_axis": "unknown --mesh axis 'rows'"}
    for name, text in want.items():
        assert r[name]["rc"] == 2, (name, r[name])
        lines = r[name]["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("msrnn: error: ") and "--mesh" in lines[0], (name, lines)
        assert text in lines[0], (name, lines)
    lines = r["serve_rows"]["stderr"].strip().splitlines()
    assert r["serve_rows"]["rc"] == 2 and len(lines) == 1, r["serve_rows"]
    assert "--max-batch 4 does not split over mesh data=8" in lines[0], lines
    lines = r["serve_pallas"]["stderr"].strip().splitlines()
    assert r["serve_pallas"]["rc"] == 2 and len(lines) == 1 and "pallas" in lines[0], r["serve_pallas"]
    # and model=3 divides 3 KV heads: a 2x3 mesh runs and matches one device
    assert r["model3"]["pos"] and r["model3"]["nll"] < TOL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_one_mesh_equal_one_process(tmp_path):
    """Two jax.distributed processes (2 CPU devices each) form one data=2 x model=2 mesh;
    their sharded tova perplexity equals this process's one-device run."""
    from hf_models import save_tiny_model

    from msrnn_jax.run.api import load_model
    from msrnn_jax.run.evaluate import run_policy

    folder = save_tiny_model(tmp_path / "model", "llama-gqa")
    ids = np.random.default_rng(7).integers(0, 300, (3, 41)).astype(np.int32)
    np.save(Path(folder) / "ids.npy", ids)
    with jax.default_device(jax.devices("cpu")[0]):  # the workers run on CPU devices too
        ref = run_policy(load_model(folder, layers="stacked"), "tova", 12, ids, steps_per_call=16)
    port, out = _free_port(), tmp_path / "dist.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(CHECKS), "--worker", str(i), str(port), folder, str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errs)
    got = json.loads(out.read_text())
    assert got["devices"] == 4 and got["processes"] == 2
    np.testing.assert_allclose(np.asarray(got["nll"]), ref.nll, atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(got["pos"]), np.asarray(ref.state.pos))


# -- precision (one device) --------------------------------------------------------------
def _dot_precisions(fn, *args) -> set:
    """The precision attribute of every dot_general in fn's jaxpr (nested ones included)."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.add(str(eqn.params["precision"]))
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_fp32_params_get_highest_matmuls_bf16_the_default():
    """Every dot of the step and the scans is HIGHEST for fp32 params (also when the step
    is called outside any jit), the backend default (None) for bf16, and an explicit
    precision wins over the dtype's."""
    from msrnn_jax.core.step import scan, step
    from msrnn_jax.params import init_params
    from msrnn_jax.core.policies import make_policy
    from msrnn_jax.core.state import State
    from msrnn_jax.config import preset

    cfg = preset("tiny")
    pol = make_policy("tova")
    tok = jnp.zeros((2,), jnp.int32)
    for dtype, want in ((jnp.float32, "HIGHEST"), (jnp.bfloat16, "None")):
        params = init_params(cfg, jax.random.key(0), dtype)
        st = State.init(cfg, 2, 4, dtype)
        got = _dot_precisions(lambda p, s: step(p, cfg, pol, s, tok), params, st)
        assert got and all(want in g for g in got), (dtype, got)
        got = _dot_precisions(lambda p, s: scan.__wrapped__(p, cfg, pol, s, tok[:, None], emit="nll", targets=tok[:, None]),
                              params, st)
        assert got and all(want in g for g in got), (dtype, got)
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    with jax.default_matmul_precision("default"):
        got = _dot_precisions(lambda p, s: step(p, cfg, pol, s, tok), params, State.init(cfg, 2, 4))
    assert got and not any("HIGHEST" in g for g in got), got


def test_precision_argument_is_checked_and_kept():
    from msrnn_jax.run.api import Model
    from msrnn_jax.errors import InvalidArgument
    from msrnn_jax.fast.precision import check_precision

    with pytest.raises(InvalidArgument) as e:
        check_precision("tf32")
    assert e.value.param == "precision"
    m = Model(None, {}, precision=check_precision("HIGH"))
    with m.scope():
        assert jax.config.jax_default_matmul_precision == "high"
    assert jax.config.jax_default_matmul_precision is None


@pytest.mark.parametrize("mesh", [(1, 8), (2, 4)])
def test_memory_plan_bytes_by_hand(mesh):
    """The plan's per-device bytes for Llama-2-70B equal the count from the shapes (bf16
    matrices split M ways, norms whole; the state's rows over D and KV heads over M), and
    its largest batch is the last multiple of D within the budget."""
    from msrnn_jax.fast import sharding

    D, M = mesh
    L, E, F, V, Hq, Hkv, Dh = 80, 8192, 28672, 32000, 64, 8, 128
    matrices = 2 * V * E + L * (E * Hq * Dh + 2 * E * Hkv * Dh + Hq * Dh * E + 3 * E * F)
    norms = E + L * 2 * E
    params = 2 * (matrices // M + norms)
    budget_gib = 80.0
    rows = [r for r in sharding.memory_plan(8, budget_gib, capacities=(512,), meshes=(mesh,))
            if r.model == "llama2-70b"]
    assert [(r.policy, r.capacity) for r in rows] == [("full", 4096), ("tova", 512)]
    for r in rows:
        per_row = L * (Hkv // M) * r.capacity * (2 * 2 * Dh + 4 + 4) + 4  # keys, values bf16; pos, score; length
        assert r.param_gib * 2**30 == pytest.approx(params, rel=1e-12)
        # D rows (one per data shard) cost each device one row's bytes
        assert r.state_gib_per_row * 2**30 == pytest.approx(per_row, rel=1e-12)
        assert r.largest_batch == (int(budget_gib * 2**30) - params) // per_row * D
