"""The benchmarks end to end on a tiny model, on the CPU, in seconds — each as the
subprocess its README command starts (`python -m benchmarks.<x> ...`), so that they
cannot rot silently; a few pieces of `benchmarks.serve` that need no engine (request sets,
transformers' online peer) are called directly. The shared pieces (fabricated states, the
decode loop) are `msrnn_jax.testing`'s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msrnn_jax.config import preset
from msrnn_jax import testing
from msrnn_jax.params import param_shapes
from msrnn_jax.core.policies import make_policy

ROOT = Path(__file__).resolve().parent.parent


def bench(*args, timeout=600):
    """python -m benchmarks.<args>, from the repository root; returns its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    return cfg, testing.device_params(cfg, jnp.float32)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `decode --quick` run: the llama grid (fixed and largest batches) and prefill."""
    out = tmp_path_factory.mktemp("quick")
    bench("benchmarks.decode", "--quick", "--sections", "llama,prefill", "--out", out, "--date", "d",
          "--budget-s", "600")
    path = out / "decode-d.json"
    return path, json.loads(path.read_text()), (out / "decode-d.md").read_text()


def test_fabricated_state_is_well_formed(tiny):
    cfg, _ = tiny
    st = testing.fabricate_state(cfg, 3, 16, 40, jnp.float32)
    pos = np.asarray(st.pos)
    assert pos.shape == (cfg.num_layers, 3, cfg.num_kv_heads, 16)
    # every slot holds a distinct earlier position, the same in every KV head
    assert (np.sort(pos, -1) == np.arange(24, 40)).all()
    assert (pos == pos[:, :, :1]).all()
    assert np.asarray(st.length).tolist() == [40, 40, 40]
    assert float(jnp.abs(st.keys).min()) >= 0 and float(jnp.abs(st.keys).max()) > 0.1
    part = testing.fabricate_state(cfg, 1, 16, 5, jnp.float32)
    assert (np.asarray(part.pos)[..., :5] == np.arange(5)).all() and (np.asarray(part.pos)[..., 5:] == -1).all()
    moved = testing.move_state(st, 100)
    assert (np.sort(np.asarray(moved.pos), -1) == np.arange(84, 100)).all()


def test_bench_decode_matches_step_by_step(tiny):
    """greedy_decode (what the benchmark times) is n greedy steps of core.step.step."""
    cfg, params = tiny
    pol = make_policy("tova")
    st = testing.fabricate_state(cfg, 2, 8, 20, jnp.float32)
    ref_st = jax.tree.map(jnp.copy, st)
    toks, st = testing.greedy_decode(params, cfg, pol, 3, st, jnp.ones((2,), jnp.int32))
    from msrnn_jax.core.step import step
    tok = jnp.ones((2,), jnp.int32)
    ref = []
    for _ in range(3):
        logits, ref_st = step(params, cfg, pol, ref_st, tok)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        ref.append(tok)
    assert np.asarray(toks).tolist() == np.asarray(jnp.stack(ref, 1)).tolist()
    assert (np.asarray(st.pos) == np.asarray(ref_st.pos)).all()


def test_hlo_large_buffers(tiny):
    cfg, params = tiny
    st, tok = testing.decode_inputs(cfg, 2, 16, jnp.float32)
    compiled = testing.greedy_decode.lower(params, cfg, make_policy("tova"), 2, st, tok).compile()
    big = testing.hlo_large_buffers(compiled.as_text(), 1)
    assert big and all("bytes" in b for b in big)


def _weight_bytes(cfg, batch, itemsize=2):
    """Every weight read once, but only one embedding row per batch row."""
    leaves = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))[0]
    return sum((batch * s[1] if "embed" in jax.tree_util.keystr(p) else int(np.prod(s))) * itemsize
               for p, s in leaves)


def test_decode_config_and_report(quick, tiny):
    cfg, _ = tiny
    _, result, md = quick
    llama = result["sections"]["llama"]
    assert not llama["errors"] and not llama["skipped"], (llama["errors"], llama["skipped"])
    rows = llama["decode"]
    # 7 configurations; full (at one position) twice, the rest at positions 40 and 100
    assert len(rows) == 2 + 5 * 2
    r = next(r for r in rows if (r["policy"], r["capacity"], r["batch"], r["position"]) == ("tova", 16, 2, 40))
    state_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * 16 * (2 * cfg.head_dim * 2 + 4)
    assert r["bytes_per_step"] == _weight_bytes(cfg, 2) + state_bytes
    assert r["step_ms"] > 0 and r["bw_fraction"] > 0 and r["compile_s"] > 0
    # the largest batches: capped by --max-batch-cap 8
    big = [r for r in rows if r.get("max_batch")]
    assert len(big) == 1 + 2 * 2 and all(r["batch"] == 8 for r in big)
    # the Markdown report
    assert "Decode step" in md and "| tova | 16 | 2 |" in md
    # with a measured matmul rate: the bandwidth + compute fraction, bytes and FLOPs at their rates
    bw, mm = llama["bandwidth"]["copy_bytes_per_s"], llama["matmul"]["flops_per_s"]
    want = (r["bytes_per_step"] / bw + r["flops_per_step"] / mm) / (r["step_ms"] / 1e3)
    assert f"{want:.1%}" in md


def test_kernel_bench_runs_every_variant_on_the_cpu(tmp_path):
    """benchmarks.kernel_bench in Pallas' interpreter: every variant agrees with the first."""
    out = tmp_path / "k.json"
    bench("benchmarks.kernel_bench", "--json", out, "--cases", "t:2:2:4:32", "--variants",
          "auto/0/0,vpu/16/0,mma/16/2", "--repeat", "2", "--reps", "1", "--bw-bytes", "4000000")
    rows = json.loads(out.read_text())["cases"][0]["rows"]
    assert [r["variant"] for r in rows] == ["auto/0/0", "vpu/16/0", "mma/16/2"]
    for r in rows:
        assert "error" not in r and r["scores_us"] > 0 and r["mix_us"] > 0
        assert max(r["max_abs_diff"]) < 1e-3
    assert (tmp_path / "k.md").exists()


def test_kernel_bench_reads_an_8bit_state(tmp_path):
    """--state-dtype int8: the kernels read the codes and scales (the bytes counted are both);
    on tensor cores (G=4) they dequantize to the query's bf16 as XLA's einsum of the
    dequantized buffer does, and the f32 multiply-and-sum (vpu) of codes x scale differs
    from those by bf16's rounding of the dequantized numbers alone."""
    out = tmp_path / "k8.json"
    bench("benchmarks.kernel_bench", "--json", out, "--cases", "t:2:2:4:32", "--variants",
          "auto/0/0,xla,vpu/16/0,vpu/32/4", "--repeat", "2", "--reps", "1", "--bw-bytes", "4000000",
          "--state-dtype", "int8")
    case = json.loads(out.read_text())["cases"][0]
    assert case["state_dtype"] == "int8" and case["layer_state_bytes"] == 2 * 2 * 32 * (128 + 4)
    rows = {r["variant"]: r for r in case["rows"]}
    assert all("error" not in r and r["scores_us"] > 0 for r in rows.values())
    assert max(rows["xla"]["max_abs_diff"]) < 1e-4
    for v in ("vpu/16/0", "vpu/32/4"):  # scores ~ N(0, 128): bf16's relative 2^-8, not more
        assert 1e-6 < rows[v]["max_abs_diff"][0] < 0.25 and rows[v]["max_abs_diff"][1] < 1e-2
    assert "int8" in (tmp_path / "k8.md").read_text()


def test_jax_bench_sets_the_kernels_tuning(tmp_path):
    """--kernel-tuning 1:64:2 reaches kernels.TUNING (and the result file) for 8-bit states."""
    from benchmarks import jax_bench
    from msrnn_jax.fast import kernels

    before = dict(kernels.TUNING)
    try:
        res = jax_bench.main(["--section", "probe", "--model", "tiny", "--json", str(tmp_path / "p.json"),
                              "--kernel-tuning", "1:64:2", "--probe-cases", "tova/16/1", "--variants",
                              "split:pallas", "--n-steps", "1", "--reps", "1", "--bw-bytes", "0",
                              "--no-probe-window", "--state-dtype", "int8"])
        assert kernels.TUNING[1] == (64, 2) and res["kernel_tuning"]["1"] == [64, 2]
        assert not res["errors"] and res["probe"]
    finally:
        kernels.TUNING.clear()
        kernels.TUNING.update(before)


def test_rotated_scores_bench_times_every_form(tmp_path):
    """benchmarks.rotated_scores --quick: the plain product and both forms of the rotated
    one, with shared and per-head ranks, each timed once, in the JSON and the table."""
    bench("benchmarks.rotated_scores", "--quick", "--out", tmp_path)
    (js,), (md,) = tmp_path.glob("rotated-scores-*.json"), tmp_path.glob("rotated-scores-*.md")
    rows = json.loads(js.read_text())["rows"]
    assert [(r["product"], r["ranks"]) for r in rows] == [
        ("plain (absolute)", "-"), ("sum", "shared"), ("query", "shared"), ("sum", "per-head"),
        ("query", "per-head")]
    assert all(r["us_per_layer"] > 0 for r in rows)
    assert md.read_text().count("\n| ") == 1 + len(rows)


def test_prefill_timers(quick):
    _, result, _ = quick
    prefill = result["sections"]["prefill"]
    assert not prefill["errors"]
    recs = {r["mode"]: r for r in prefill["prefill"]}
    assert sorted(recs) == ["chunked", "exact", "exact-scan", "oneshot"]  # exact: layer by layer
    assert all(r["tokens_per_s"] > 0 for r in recs.values())
    assert recs["exact"]["compile_s"] > 0 and recs["exact-scan"]["compile_s"] > 0
    assert recs["chunked"]["chunk"] == 16


def test_hf_peer_integration_math(tmp_path):
    """The peer's 4096-step figure is its measured step times, interpolated linearly in the
    cache length and summed over the cache lengths 32 .. 4127."""
    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    bench("benchmarks.hf_peer", "--json", out, "--model", "tiny", "--device", "cpu", "--lens", "4,8",
          "--new-tokens", "3", "--caches", "dynamic")
    res = json.loads(out.read_text())
    assert not res["errors"] and len(res["runs"]) == 2
    for s in res["runs"]:
        xs = [p["cache_len"] for p in s["points"]]
        ys = [p["step_ms"] / 1e3 for p in s["points"]]
        want = float(np.interp(32 + np.arange(4096.0), xs, ys).sum())
        assert s["decode4096_s"] == pytest.approx(want)
        assert s["decode4096_tokens_per_s"] == pytest.approx(s["batch"] * 4096 / want)


def test_largest_batch_shrinks_to_fit_the_executable(tmp_path):
    """A largest-batch job starts from the state-only estimate and shrinks the batch until
    XLA's analysis of the executable fits the budget (here the state alone fills the
    budget, so the params and temporaries force a shrink)."""
    cfg = preset("tiny")
    row = cfg.num_layers * cfg.num_kv_heads * 16 * (2 * cfg.head_dim * 2 + 4 + 4) + 4  # one state row, bf16
    free = 64 << 20  # what the benchmark assumes on the CPU
    out = tmp_path / "max.json"
    bench("benchmarks.jax_bench", "--section", "decode", "--json", out, "--model", "tiny", "--jobs", "tova/16/max",
          "--n-steps", "2", "--reps", "1", "--positions", "40", "--reserve-bytes", free - 200 * row,
          "--bw-bytes", "4000000", "--matmul-n", "128", "--variant", "split:einsum")
    res = json.loads(out.read_text())
    assert not res["errors"] and res["memory_budget"]["free"] == free
    (r,) = res["decode"]
    assert r["shrinks"] and r["shrinks"][0]["batch"] == 200  # the state-only estimate
    assert r["batch"] < 200 and r["batch"] % 8 == 0
    assert r["exe_peak_bytes"] <= res["memory_budget"]["exe_budget"]


def test_resume_runs_only_what_was_skipped(quick, tmp_path):
    """decode --resume: a result that skipped a configuration gets it from a second run,
    merged in as a supplementary run; a complete result runs nothing."""
    out = tmp_path / "out"
    out.mkdir()
    path = out / "decode-d.json"
    shutil.copy(quick[0], path)
    prev = json.loads(path.read_text())
    del prev["sections"]["prefill"]
    llama = prev["sections"]["llama"]
    gone = [r for r in llama["decode"] if r["policy"] == "window" and r["batch"] == 1]
    assert len(gone) == 2  # positions 40 and 100
    llama["decode"] = [r for r in llama["decode"] if r not in gone]
    llama["skipped"] = [{"policy": "window", "capacity": 16, "batch": 1, "variant": "split:einsum",
                         "reason": "deadline"}]
    path.write_text(json.dumps(prev))

    plan = json.loads(bench("benchmarks.decode", "--resume", path, "--sections", "llama,prefill,hf", "--plan"))
    assert plan["sections"] == ["llama", "prefill", "hf"]  # prefill and hf were never run
    assert plan["extra"] == {"llama": ["--jobs", "window/16/1@split:einsum"]}

    bench("benchmarks.decode", "--quick", "--sections", "llama", "--out", out, "--resume", path)
    merged = json.loads(path.read_text())
    rows = merged["sections"]["llama"]["decode"]
    back = [r for r in rows if r["policy"] == "window" and r["batch"] == 1]
    assert len(back) == 2 and all(r["run"] == "supplementary 1" for r in back)
    assert len(rows) == len(llama["decode"]) + 2  # nothing else ran again
    assert not merged["sections"]["llama"]["skipped"] and len(merged["commands_supplementary"]) == 1
    assert "†1" in (out / "decode-d.md").read_text()
    assert json.loads(bench("benchmarks.decode", "--resume", path, "--sections", "llama", "--plan")) == \
        {"sections": [], "extra": {}}
    assert "nothing skipped" in bench("benchmarks.decode", "--quick", "--sections", "llama", "--out", out,
                                      "--resume", path)


def test_merge_numbers_runs_after_those_already_merged(tmp_path):
    row = {"model": "tiny", "policy": "tova", "capacity": 16, "batch": 2, "position": 40, "step_ms": 1.0,
           "tokens_per_s": 2000.0, "bytes_per_step": 1e6, "flops_per_step": 1e9, "label": "grid",
           "variant": "split:einsum", "achieved_bytes_per_s": 1e9, "achieved_tflops": 1e-3}
    main = {"date": "d", "command": "first", "info": {}, "commands_supplementary": ["second"],
            "sections": {"llama": {"decode": [dict(row, run="supplementary 1")], "started": 1,
                                   "bandwidth": {"copy_bytes_per_s": 1e10, "read_bytes_per_s": 1e10}}}}
    supp = {"command": "third", "sections": {"llama": {"decode": [dict(row, step_ms=0.5)], "started": 2}}}
    paths = [tmp_path / "main.json", tmp_path / "supp.json"]
    for p, obj in zip(paths, (main, supp)):
        p.write_text(json.dumps(obj))
    bench("benchmarks.merge", paths[0], paths[1], "--out", tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    (r,) = out["sections"]["llama"]["decode"]  # the newer figure replaces the older
    assert r["run"] == "supplementary 2" and r["step_ms"] == 0.5
    assert r["bw_fraction"] == pytest.approx(1e6 / 0.5e-3 / 1e10)
    assert out["commands_supplementary"] == ["second", "third"]
    assert "†2" in (tmp_path / "out.md").read_text()


def test_eval_report_tables_csv_and_plot(tmp_path, capsys):
    """benchmarks.eval_report: hand-made eval records -> one table per length (a cell is
    the depths answered right), the CSV rows, a PNG."""
    from benchmarks import eval_report

    recs = [{"task": "passkey", "policy": "full", "capacity": 100, "length": 100, "depth": d, "samples": 1,
             "correct": 1, "accuracy": 1.0, "model": "m"} for d in (0.0, 1.0)]
    recs += [{"task": "passkey", "policy": p, "capacity": c, "length": 100, "depth": d, "samples": 2,
              "correct": k, "accuracy": k / 2, "model": "m"}
             for p, c, d, k in [("tova", 8, 0.0, 0), ("tova", 8, 1.0, 1), ("window", 8, 0.0, 0), ("window", 8, 1.0, 0),
                                ("tova", 16, 0.0, 2), ("tova", 16, 1.0, 2)]]
    src = tmp_path / "e.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    eval_report.main([str(src), "--csv", str(tmp_path / "e.csv"), "--plot", str(tmp_path / "e.png")])
    out = capsys.readouterr().out
    assert "| policy | C=8 | C=16 |" in out
    assert "| full (C = length) | ✓ all | ✓ all |" in out
    assert "| window | · none | – |" in out
    assert "| tova | 1 (0.50) | ✓ all |" in out
    assert len((tmp_path / "e.csv").read_text().splitlines()) == len(recs) + 1
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_request_slices_add_up():
    """`benchmarks.serve --hf-range A:B` runs a slice of the --requests set: the first k
    requests of every set are the same, so slices of one set measured apart are that set."""
    import argparse

    from benchmarks.serve import request_range, requests

    big = requests(40, 8, 30, 100)
    assert requests(12, 8, 30, 100) == big[:12]
    assert request_range("12:40") == (12, 40)
    for bad in ("12", "a:b", "5:3", "-1:4"):
        with pytest.raises(argparse.ArgumentTypeError):
            request_range(bad)


def test_serve_merge_of_slices(tmp_path):
    """`benchmarks.serve --merge`: runs of one request set measured in several commands
    become one result. Slices of a system add their tokens and wall times, each system keeps
    its command, and runs that do not make one set are refused in one line (exit 2)."""
    from benchmarks.serve import merge

    def run(cmd, systems, requests=10):
        return {"command": cmd, "device": {"device_kind": "cpu"}, "model": "tiny", "requests": requests,
                "prompt_tokens": [8, 40], "generated_tokens_each": 4, "prefill_share": 0.4, "systems": systems}

    def hf(a, b, wall):
        return {"transformers generate_batch": {"offline": {
            "requests": b - a, "generated_tokens": 4 * (b - a), "wall_s": wall, "tokens_per_s": 4 * (b - a) / wall,
            "range": [a, b]}}}

    tova = run("t", {"tova C=32": {"batch": 4, "offline": {"requests": 10, "generated_tokens": 40, "wall_s": 2.0,
                                                          "tokens_per_s": 20.0}}})
    runs = [tova, run("h2", hf(4, 10, 3.0)), run("h1", hf(0, 4, 1.0))]
    out = merge(runs, "m")
    assert out["merged_from"] == ["t", "h2", "h1"] and out["systems"]["tova C=32"]["command"] == "t"
    o = out["systems"]["transformers generate_batch"]
    assert o["commands"] == ["h1", "h2"]
    assert (o["offline"]["requests"], o["offline"]["generated_tokens"], o["offline"]["wall_s"]) == (10, 40, 4.0)
    assert o["offline"]["tokens_per_s"] == 10.0
    for bad, why in [([tova, run("h", hf(0, 4, 1.0))], "do not cover"),
                     ([run("h", hf(0, 6, 1.0)), run("h", hf(4, 10, 1.0))], "do not cover"),
                     ([tova, tova], "measured in two"),
                     ([tova, run("h", hf(0, 10, 1.0), requests=12)], "different request sets")]:
        with pytest.raises(ValueError, match=why):
            merge(bad, "m")
    paths = []
    for i, r in enumerate(runs):
        paths.append(str(tmp_path / f"r{i}.json"))
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--out", str(tmp_path / "m"), "--merge", *paths],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "m" / "serve.json").read_text())["systems"] == out["systems"]
    assert "| transformers generate_batch |  | 10.0 | 4.0 |" in (tmp_path / "m" / "serve.md").read_text()
    assert (tmp_path / "m" / "serve.png").read_bytes()[:4] == b"\x89PNG"
    p = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--out", str(tmp_path / "m2"), "--merge", paths[1]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "do not cover" in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "m2").exists()


def test_serve_transformers_online_peer():
    """`benchmarks.serve`'s online transformers peer (its continuous-batching manager given
    each request at its Poisson arrival time) on the tiny shape on the CPU: every request
    finishes with its fixed length, the load lasts at least until the last arrival, and the
    arrivals are the ones the engine is given (one seed). In a subprocess that sees no GPU:
    on a GPU machine transformers' manager pins host memory through CUDA beside the other
    test processes."""
    pytest.importorskip("torch", reason="transformers' PyTorch model (test extra 'torch')")
    code = """if 1:
        import json
        import numpy as np
        from benchmarks.serve import arrival_sets, hf_online, requests
        sets = arrival_sets([8.0], 4)
        assert np.array_equal(sets[0][1], arrival_sets([8.0], 4)[0][1]) and (np.diff(sets[0][1]) > 0).all()
        # a paged cache for these 4 requests (sized by the free memory it took 10.8 GB of RAM)
        rows = hf_online("tiny", requests(4, 8, 20, 100), 5, "cpu", 256, {"num_blocks": 16}, sets, timeout_s=120)
        print(json.dumps({"last_arrival": float(sets[0][1][-1]), "rows": rows}))
    """
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["rows"]) == 1
    r = out["rows"][0]
    assert r["rate"] == 8.0 and r["requests"] == 4 and r["generated_tokens"] == 20
    assert r["wall_s"] >= out["last_arrival"]
    assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] < 120 and 0 < r["itl_p50_s"] <= r["itl_p99_s"]


def test_mesh_bench(tmp_path):
    """`benchmarks.mesh_bench` (the decode at a data=1,model=1 mesh against none) on the
    tiny shape: four positive step times, their ratios, and the same greedy tokens from
    each layout with the mesh as without."""
    out = tmp_path / "m.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.mesh_bench", "--model", "tiny", "--capacity", "16",
                        "--steps", "4", "--reps", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert all(rec[k] > 0 for k in ("plain_ms", "mesh_ms", "fused_ms", "mesh_fused_ms"))
    assert rec["ratio"] == rec["mesh_ms"] / rec["plain_ms"] and rec["ratio_fused"] == rec["mesh_fused_ms"] / rec["fused_ms"]
    assert rec["same_tokens"]["mesh"] is True and rec["same_tokens"]["mesh_fused"] is True, rec["same_tokens"]


def _finite_positive(x):
    return x is not None and np.isfinite(x) and x > 0


@pytest.mark.parametrize("state", ["float32", "int8"])
def test_serve_quick_prints_the_bound_of_its_workload(tmp_path, state):
    """`benchmarks.serve --quick` (as it is, and with an int8 state and no online load):
    the device's rates measured in the run, and per system and phase (prefill, decode,
    total) its measured time, its bound and bound / measured, in serve.json and the printed
    table; the decode bound's bytes are the weights once per recorded step plus each
    generated token's row of slots (8-bit: data, scales; and positions)."""
    from benchmarks.bound import slot_bytes
    from benchmarks.common import weight_bytes_per_step
    from benchmarks.serve import requests

    out = tmp_path / "s"
    more = ["--rates", "", "--state-dtype", "int8"] if state == "int8" else []
    text = bench("benchmarks.serve", "--quick", *more, "--out", out)
    res = json.loads((out / "serve.json").read_text())
    assert _finite_positive(res["rates"]["matmul_flops_per_s"]) and _finite_positive(res["rates"]["copy_bytes_per_s"])
    tag = " int8" if more else ""
    names = [f"tova C=32{tag}", f"full C=64{tag}"]
    assert list(res["systems"]) == names, res["systems"]
    rows = res["bound_table"]
    assert [(r["system"], r["phase"]) for r in rows] == [(n, p) for n in names for p in ("prefill", "decode", "total")]
    for r in rows:
        assert _finite_positive(r["measured_s"]) and _finite_positive(r["bound_s"]) and _finite_positive(r["fraction"])
        assert r["fraction"] == pytest.approx(r["bound_s"] / r["measured_s"])
    assert "| system | phase | measured s | bound s | fraction |" in text and f"| {names[0]} | decode |" in text
    cfg = preset("tiny")
    tova = res["systems"][names[0]]
    b, st = tova["bound"], tova["engine_stats"]
    assert tova["state_dtype"] == state and b["decode"]["slot_bytes"] == slot_bytes(cfg, state)
    assert b["decode"]["steps"] == st["chunks"] * 4 and b["decode"]["tokens"] == st["decode_tokens"] == 12 * 7
    lens = [len(p) for p in requests(12, 8, 40, cfg.vocab_size)]
    slots = sum(min(P + j - 1, 32) for P in lens for j in range(1, 8))
    want = (b["decode"]["steps"] * weight_bytes_per_step(cfg, 4, 4)
            + slots * cfg.num_layers * cfg.num_kv_heads * slot_bytes(cfg, state))
    assert b["decode"]["bytes"] == pytest.approx(want)
    assert b["prefill"]["measured_s"] == pytest.approx(st["prefill_seconds"])
    assert b["total"]["bound_s"] == pytest.approx(b["prefill"]["bound_s"] + b["decode"]["bound_s"])
    assert b["total"]["measured_s"] == tova["offline"]["wall_s"]
    # the fixed-batch decode against its own bandwidth bound
    assert 0 < tova["overhead"]["bound"]["fraction"] < float("inf")


def test_bound_counts():
    """benchmarks.bound: the Llama-2-7B prompt token's FLOPs (~13.5 G with chunked
    attention at C = S = 512), causal pairs, slot bytes, and slices combined."""
    from benchmarks import bound

    cfg = preset("llama2-7b")
    assert 2 * bound.matmul_params(cfg) == 2 * 32 * (4096 * 3 * 4096 + 4096 * 4096 + 3 * 4096 * 11008)
    n = bound.prefill_counts(cfg, [4096], True, 512, 512)
    per_token = (n["flops"] - n["flops_lm_head"]) / 4096
    assert per_token == pytest.approx(2 * bound.matmul_params(cfg) + 4 * 32 * 128 * 32 * 1024)
    assert 13.4e9 < per_token < 13.6e9
    assert n["pieces"] == 8 and n["flops_computed"] > n["flops"]
    causal = bound.prefill_counts(cfg, [3, 5], False)
    assert causal["attention_pairs"] == 6 + 15
    assert bound.slot_bytes(cfg, "bfloat16") == 2 * 128 * 2 + 4 and bound.slot_bytes(cfg, "fp8") == 2 * 132 + 4
    d = bound.decode_counts(cfg, [600], 3, 1, True, 512, steps=None)
    assert d["steps"] == 2 and d["state_bytes"] == 2 * 512 * 32 * 32 * bound.slot_bytes(cfg, "bfloat16")
    rates = {"matmul_flops_per_s": 1e15, "copy_bytes_per_s": 4e12}
    one = bound.system_bound(cfg, [600], 3, rates, bounded=True, capacity=512, chunk=512, batch=1,
                             state_dtype="bfloat16", steps=None, prefill_s=1.0, decode_s=None, total_s=2.0)
    assert one["decode"]["fraction"] is None and one["total"]["fraction"] == one["total"]["bound_s"] / 2.0
    two = bound.combine([one, one])
    assert two["total"]["bound_s"] == 2 * one["total"]["bound_s"] and two["total"]["measured_s"] == 4.0
    assert two["decode"]["measured_s"] is None and two["prefill"]["fraction"] == one["prefill"]["fraction"]
    # transformers: its decode time is its offline run less the prefill-only run of the same requests
    from benchmarks.serve import hf_bound
    rec = {"offline": {"wall_s": 10.0, "range": [1, 3]}, "prefill_only": {"wall_s": 4.0}}
    hb = hf_bound(cfg, [[1] * 600, [1] * 700, [1] * 800], 3, rates, rec, 1)
    assert (hb["prefill"]["measured_s"], hb["decode"]["measured_s"], hb["total"]["measured_s"]) == (4.0, 6.0, 10.0)
    assert hb["prefill"]["tokens"] == 1500 and hb["decode"]["steps"] == 4  # 2 x (3 - 1) tokens, one row at a time


def test_serve_runs_transformers_in_a_process_of_its_own(tmp_path):
    """`benchmarks.serve` with tova and transformers: the JAX system and the transformers
    peer each run in a child process (JAX's exits before transformers starts), and
    transformers' record comes back as JSON with its bound (steps not recorded: decode
    tokens / batch)."""
    pytest.importorskip("torch", reason="transformers' PyTorch model (test extra 'torch')")
    pytest.importorskip("transformers")
    out = tmp_path / "s"
    bench("benchmarks.serve", "--quick", "--systems", "tova,hf", "--requests", "3", "--gen", "4", "--rates", "",
          "--hf-modes", "offline", "--no-hf-phases", "--out", out)
    res = json.loads((out / "serve.json").read_text())
    hf = res["systems"]["transformers generate_batch"]
    assert "error" not in hf, hf
    assert hf["offline"]["generated_tokens"] == 12 and hf["process"]["pid"] != res["pid"]
    assert res["pid"] != os.getpid() and "tova C=32" in res["systems"]
    b = hf["bound"]
    assert b["decode"]["steps_from"].startswith("not recorded") and b["prefill"]["measured_s"] is None
    assert _finite_positive(b["total"]["fraction"])
    assert any(r["system"] == "transformers generate_batch" and r["phase"] == "total" for r in res["bound_table"])


def test_the_8bit_eval_table_sums_every_depth(tmp_path):
    """benchmarks.quantized_table --eval: correct / samples over every depth, per task,
    policy and capacity, one column per state dtype."""
    import json as _json

    from benchmarks.quantized_table import eval_table

    def rec(pol, cap, depth, correct):
        return {"task": "passkey", "policy": pol, "capacity": cap, "depth": depth, "samples": 4, "correct": correct}

    (tmp_path / "passkey-float32.jsonl").write_text("\n".join(_json.dumps(r) for r in [
        rec("full", 64, 0.0, 4), rec("full", 64, 1.0, 3), rec("tova", 32, 0.0, 1), rec("tova", 32, 1.0, 2)]))
    (tmp_path / "passkey-int8.jsonl").write_text("\n".join(_json.dumps(r) for r in [
        rec("full", 64, 0.0, 4), rec("full", 64, 1.0, 2), rec("tova", 32, 0.0, 0), rec("tova", 32, 1.0, 2)]))
    lines = eval_table(tmp_path).splitlines()
    assert lines[0] == "| task | policy | C | float32 | int8 |"
    assert lines[2] == "| passkey | full | 64 | 7/8 | 6/8 |"
    assert lines[3] == "| passkey | tova | 32 | 3/8 | 2/8 |"


def test_transformers_quantized_cache_beside_the_8bit_state(tiny_dir, tmp_path, capsys):
    """benchmarks.hf_quantized on a tiny model: transformers' float32 cache, fed token by
    token, gives the NLL of `msrnn ppl --policy full` on the same tokens (one model); its fp8
    cache changes it; a backend whose package is missing is named, not run; and
    quantized_table --hf puts both side by side (ours from `msrnn ppl --json` files)."""
    import transformers

    from benchmarks import hf_quantized, quantized_table
    from msrnn_jax.cli import main as cli

    if "fp8" not in __import__("inspect").getsource(transformers.QuantizedCache.__init__):
        pytest.skip(f"transformers {transformers.__version__} has no fp8 QuantizedCache backend (5.25 has)")
    (tmp_path / "data").mkdir()
    text = "It was the best of times, it was the worst of times. Paris is the capital of France. " * 8
    (tmp_path / "data" / "book.txt").write_text(text)
    out = tmp_path / "hf"
    assert hf_quantized.main(["--out", str(out), "--tokens", "40", "--data", str(tmp_path / "data"), "--books",
                              "book", "--caches", "float32,fp8", "--model", tiny_dir]) == 0
    rows = {r["cache"]: r for r in map(json.loads, (out / "book.jsonl").read_text().splitlines())}
    assert rows["float32"]["tokens"] == rows["fp8"]["tokens"] == 40
    ours = tmp_path / "ours"
    ours.mkdir()
    for d in ("float32", "int8", "fp8"):
        capsys.readouterr()
        assert cli(["ppl", str(tmp_path / "data" / "book.txt"), "--model", tiny_dir, "--policy", "full", "--tokens",
                    "40", "--state-dtype", d, "--json"]) == 0
        (ours / f"book-{d}.jsonl").write_text(capsys.readouterr().out)
    mine = json.loads((ours / "book-float32.jsonl").read_text())
    assert abs(rows["float32"]["mean_nll"] - mine["mean_nll"]) < 1e-5 * mine["mean_nll"]
    assert rows["fp8"]["mean_nll"] != rows["float32"]["mean_nll"] and np.isfinite(rows["fp8"]["mean_nll"])
    missing = [c for c in hf_quantized.CACHES if not hf_quantized.installed(c[3])]
    table = quantized_table.hf_table(quantized_table.load(ours), out)
    line = table.splitlines()[2]
    assert line.startswith(f"| book | 40 | {mine['ppl']:.2f} |")
    want = 100 * (rows["fp8"]["ppl"] / rows["float32"]["ppl"] - 1)
    assert f"fp8 {want:+.2f}%" in line
    if missing:  # the missing backends are named, with what to install
        assert hf_quantized.main(["--out", str(out), "--tokens", "40", "--data", str(tmp_path / "data"), "--books",
                                  "book", "--caches", missing[0][0], "--model", tiny_dir]) == 0
        assert "pip install" in (out / "book.jsonl").read_text()
