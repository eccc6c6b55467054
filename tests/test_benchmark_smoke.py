"""The GPU decode benchmark's core functions on a tiny model, on the CPU, in seconds —
so that benchmarks/decode.py cannot rot silently."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, jax_bench, report
from msrnn_jax.policies import make_policy


@pytest.fixture(scope="module")
def tiny():
    cfg = common.model_config("tiny")
    return cfg, common.device_params(cfg, jnp.float32)


def test_fabricated_state_is_well_formed(tiny):
    cfg, _ = tiny
    st = common.fabricate_state(cfg, 3, 16, 40, jnp.float32)
    pos = np.asarray(st.pos)
    assert pos.shape == (cfg.num_layers, 3, cfg.num_kv_heads, 16)
    # every slot holds a distinct earlier position, the same in every KV head
    assert (np.sort(pos, -1) == np.arange(24, 40)).all()
    assert (pos == pos[:, :, :1]).all()
    assert np.asarray(st.length).tolist() == [40, 40, 40]
    assert float(jnp.abs(st.keys).min()) >= 0 and float(jnp.abs(st.keys).max()) > 0.1
    part = common.fabricate_state(cfg, 1, 16, 5, jnp.float32)
    assert (np.asarray(part.pos)[..., :5] == np.arange(5)).all() and (np.asarray(part.pos)[..., 5:] == -1).all()
    moved = common.move_state(st, 100)
    assert (np.sort(np.asarray(moved.pos), -1) == np.arange(84, 100)).all()


def test_bench_decode_matches_step_by_step(tiny):
    """bench_decode (what the benchmark times) is n greedy steps of model.step."""
    cfg, params = tiny
    pol = make_policy("tova")
    st = common.fabricate_state(cfg, 2, 8, 20, jnp.float32)
    ref_st = jax.tree.map(jnp.copy, st)
    toks, st = jax_bench.bench_decode(params, cfg, pol, 3, st, jnp.ones((2,), jnp.int32))
    from msrnn_jax.model import step
    tok = jnp.ones((2,), jnp.int32)
    ref = []
    for _ in range(3):
        logits, ref_st = step(params, cfg, pol, ref_st, tok)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        ref.append(tok)
    assert np.asarray(toks).tolist() == np.asarray(jnp.stack(ref, 1)).tolist()
    assert (np.asarray(st.pos) == np.asarray(ref_st.pos)).all()


def test_decode_config_and_report(tiny):
    cfg, params = tiny
    results = {"model": "tiny", "decode": [], "errors": []}
    bw = 1e11
    for pname in ("tova", "window"):
        compiled, crec = jax_bench.run_decode_config(params, cfg, pname, 16, 2, [40, 100], 2, 1, bw, results, "grid")
        assert compiled is not None and crec["compile_s"] > 0
    compiled, crec = jax_bench.run_decode_config(params, cfg, "full", 64, 2, [20], 2, 1, bw, results, "max",
                                                 {"max_batch": True})
    assert not results["errors"], results["errors"]
    assert len(results["decode"]) == 5
    r = results["decode"][0]
    assert r["bytes_per_step"] == common.weight_bytes_per_step(cfg, batch=2) + common.state_read_bytes_per_step(cfg, 2, 16)
    assert r["step_ms"] > 0 and r["bw_fraction"] > 0
    # the largest batch helper and the HLO scan
    assert jax_bench.max_batch(cfg, 16, 10 * common.state_row_bytes(cfg, 16), reserve=0, multiple=1) == 10
    big = jax_bench.hlo_large_buffers(compiled.as_text(), 1)
    assert big and all("bytes" in b for b in big)
    # the Markdown report renders from a merged result
    merged = {"date": "today", "command": "x", "info": {}, "sections": {"llama": results}}
    merged["analysis"] = report.analyse(merged)
    md = report.render(merged)
    assert "Decode step" in md and "| tova | 16 | 2 |" in md
    # with a measured matmul rate: the bandwidth + compute fraction, bytes and FLOPs at their rates
    results["matmul"] = {"n": 8, "s": 1.0, "flops_per_s": 1e12}
    want = (r["bytes_per_step"] / bw + r["flops_per_step"] / 1e12) / (r["step_ms"] / 1e3)
    assert report._seq_fraction(r, results) == pytest.approx(want)
    assert report._seq_fraction(r, {}) is None
    assert f"{want:.1%}" in report.render(merged)


def test_kernel_bench_runs_every_variant_on_the_cpu(tmp_path, monkeypatch):
    """benchmarks.kernel_bench in Pallas' interpreter: every variant agrees with the first."""
    from benchmarks import kernel_bench
    monkeypatch.setattr(kernel_bench, "copy_bandwidth", lambda: {"copy_bytes_per_s": 1e10, "read_bytes_per_s": 1e10})
    out = tmp_path / "k.json"
    kernel_bench.main(["--json", str(out), "--cases", "t:2:2:4:32", "--variants", "auto/0/0,vpu/16/0,mma/16/2",
                       "--repeat", "2", "--reps", "1"])
    import json
    rows = json.loads(out.read_text())["cases"][0]["rows"]
    assert [r["variant"] for r in rows] == ["auto/0/0", "vpu/16/0", "mma/16/2"]
    for r in rows:
        assert "error" not in r and r["scores_us"] > 0 and r["mix_us"] > 0
        assert max(r["max_abs_diff"]) < 1e-3
    assert (tmp_path / "k.md").exists()


def test_prefill_timers(tiny):
    cfg, params = tiny
    for mode, chunk in (("oneshot", None), ("chunked", 8)):
        rec = jax_bench.time_prefill(params, cfg, "tova", 8, 24, mode, chunk, runs=1)
        assert rec["tokens_per_s"] > 0
    rec = jax_bench.time_exact_prefill(params, cfg, "tova", 8, 24)
    assert rec["tokens_per_s"] > 0 and rec["compile_s"] > 0


def test_hf_peer_integration_math():
    from benchmarks.hf_peer import integrate
    # constant step time: 4096 steps of 10 ms
    assert abs(integrate([(0, 0.01), (5000, 0.01)]) - 40.96) < 1e-9
    # linear in the cache length: mean of the end points
    t = integrate([(32, 0.01), (4128, 0.03)], prompt=32, n=4096)
    assert abs(t / 4096 - 0.02) < 1e-4


def test_largest_batch_shrinks_to_fit_the_executable(tiny, monkeypatch):
    """build_decode(batch="max") starts from the state-only estimate and shrinks the batch
    until XLA's analysis of the executable fits the budget, also when temporaries grow
    with the batch."""
    cfg, params = tiny
    real = jax_bench.compile_decode

    def fake(params, cfg, policy, batch, capacity, n_steps, impl=None, options=None):
        compiled, rec = real(params, cfg, policy, batch, capacity, n_steps)
        row = common.state_row_bytes(cfg, capacity)
        rec = dict(rec, exe_peak_bytes=1000 + batch * 2 * row, arg_bytes=1000 + batch * row)  # temps = 1 state
        return compiled, rec

    monkeypatch.setattr(jax_bench, "compile_decode", fake)
    monkeypatch.setattr(jax_bench, "param_bytes", lambda cfg: 1000)
    row = common.state_row_bytes(cfg, 16)
    free = 200 * row
    b, _, rec = jax_bench.build_decode(params, cfg, "tova", 16, "max", 2, budget=1000 + free, free=free)
    assert rec["shrinks"] and rec["shrinks"][0]["batch"] == 200
    assert b == 96  # half the state-only estimate (temporaries = one state), a multiple of 8


def test_resume_runs_only_what_was_skipped(tmp_path):
    """decode --resume: a result that skipped a configuration gets it from a second run,
    merged in as a supplementary run; a complete result runs nothing."""
    import json

    from benchmarks import decode
    out = tmp_path / "out"
    jobs = json.dumps({"llama": ["--jobs", "tova/16/1,window/16/1"]})
    path, _ = decode.main(["--quick", "--sections", "llama", "--out", str(out), "--date", "d", "--budget-s", "600",
                           "--extra", jobs])
    prev = json.loads(open(path).read())
    llama = prev["sections"]["llama"]
    assert not llama["skipped"] and not llama["errors"]
    gone = [r for r in llama["decode"] if r["policy"] == "window" and r["batch"] == 1]
    assert len(gone) == 2  # positions 40 and 100
    llama["decode"] = [r for r in llama["decode"] if r not in gone]
    llama["skipped"] = [{"policy": "window", "capacity": 16, "batch": 1, "variant": "split:einsum",
                         "reason": "deadline"}]
    common.write_json(path, prev)

    todo, extra = decode.resume_plan(prev, ["llama", "prefill", "hf"], {})
    assert todo == ["llama", "prefill", "hf"]  # prefill and hf were never run
    assert extra == {"llama": ["--jobs", "window/16/1@split:einsum"]}

    path2, md = decode.main(["--quick", "--sections", "llama", "--out", str(out), "--resume", path])
    assert path2 == path
    merged = json.loads(open(path).read())
    rows = merged["sections"]["llama"]["decode"]
    back = [r for r in rows if r["policy"] == "window" and r["batch"] == 1]
    assert len(back) == 2 and all(r["run"] == "supplementary 1" for r in back)
    assert len(rows) == len(llama["decode"]) + 2  # nothing else ran again
    assert not merged["sections"]["llama"]["skipped"] and len(merged["commands_supplementary"]) == 1
    assert "†1" in open(md).read()
    assert decode.resume_plan(merged, ["llama"], {}) == ([], {})
    assert decode.main(["--quick", "--sections", "llama", "--out", str(out), "--resume", path]) == (path, md)


def test_merge_numbers_runs_after_those_already_merged(tmp_path):
    import json

    from benchmarks import merge
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
    merge.main([str(paths[0]), str(paths[1]), "--out", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    (r,) = out["sections"]["llama"]["decode"]  # the newer figure replaces the older
    assert r["run"] == "supplementary 2" and r["step_ms"] == 0.5
    assert r["bw_fraction"] == pytest.approx(1e6 / 0.5e-3 / 1e10)
    assert out["commands_supplementary"] == ["second", "third"]
    assert "†2" in (tmp_path / "out.md").read_text()
