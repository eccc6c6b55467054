"""Merge the section results into one JSON and render the Markdown report."""

from __future__ import annotations

import math

PAPER_RATIO = {256: 8.5, 512: 4.8}  # TOVA paper, Table 1 (LLaMA-2-7B, V100): tova / full throughput
TARGETS = {"batch1_bw": 0.70, "tova_vs_window": 1.10, "table1_bw": 0.60, "vs_hf": 10.0}
TABLE1_CONFIGS = 13  # full + (tova, window, sink) x C in {256, 512, 1024, 2048}


def markdown_path(json_path: str) -> str:
    """The Markdown report beside a JSON result: x.json -> x.md."""
    return json_path.removesuffix(".json") + ".md"


def _f(x, nd=2):
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "—"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}"


def _dagger(r):
    run = r.get("run") or ""
    return (f" †{run.split()[-1] if ' ' in run else ''}") if run.startswith("supplementary") else ""


def _pct(x):
    return "—" if x is None else f"{x:.1%}"


def _seq_fraction(r, part):
    """The step's sequential bound / its time: (bytes read / copy bandwidth + matmul FLOPs /
    the measured bf16 matmul rate) / step time. The step's kernels run one after another,
    so at the largest batches, where the weight products become compute-bound, the
    bandwidth bound alone is out of reach. None without both rates."""
    bw = ((part or {}).get("bandwidth") or {}).get("copy_bytes_per_s")
    mm = ((part or {}).get("matmul") or {}).get("flops_per_s")
    if not (mm and r.get("flops_per_step")) or not (bw or r.get("bound_step_ms")):
        return None
    # the bandwidth term the row's own fraction uses (merged files: the main run's bandwidth)
    t_bytes = r["bound_step_ms"] / 1e3 if r.get("bound_step_ms") else r["bytes_per_step"] / bw
    return (t_bytes + r["flops_per_step"] / mm) / (r["step_ms"] / 1e3)


def _decode_rows(part):
    return [r for r in (part or {}).get("decode", []) if r.get("label") in ("grid", "max")]


def _best_rows(rows):
    """One row per (policy, capacity, batch or "max", position): the fastest variant per
    token (a configuration measured with several step implementations)."""
    best = {}
    for r in rows:
        k = (r["policy"], r["capacity"], "max" if r.get("max_batch") else r["batch"], r["position"])
        if k not in best or r["step_ms"] / r["batch"] < best[k]["step_ms"] / best[k]["batch"]:
            best[k] = r
    return [r for r in rows if any(r is b for b in best.values())]


def analyse(merged: dict) -> dict:
    """Derived tables: Table 1 analog, targets. Reads merged['sections']; where a
    configuration ran with several step implementations, its fastest counts."""
    secs = merged.get("sections", {})
    llama = secs.get("llama") or {}
    rows = _best_rows(_decode_rows(llama))
    out = {"table1": [], "targets": {}}

    def find(policy, C=None, B=None, pos=None, max_batch=None):
        for r in rows:
            if r["policy"] != policy or (C is not None and r["capacity"] != C):
                continue
            if B is not None and r["batch"] != B:
                continue
            if max_batch is not None and bool(r.get("max_batch")) != max_batch:
                continue
            if pos is not None and r["position"] != pos:
                continue
            return r
        return None

    full = find("full", max_batch=True)
    fulls = [r for r in rows if r["policy"] == "full"]
    full_best = max(fulls, key=lambda r: r["tokens_per_s"]) if fulls else None
    out["full_best"] = ({"batch": full_best["batch"], "tokens_per_s": full_best["tokens_per_s"],
                         "variant": full_best.get("variant"), "max_batch": bool(full_best.get("max_batch"))}
                        if full_best else None)
    hf = secs.get("hf") or {}
    hf_max = [s for s in hf.get("runs", []) if s.get("largest_batch")]
    best_hf = max(hf_max, key=lambda s: s["decode4096_tokens_per_s"]) if hf_max else None
    if full:
        out["table1"].append({"policy": "full", "capacity": full["capacity"], "batch": full["batch"],
                              "tokens_per_s": full["tokens_per_s"], "vs_full": 1.0, "bound_vs_full": 1.0,
                              "vs_full_best": full["tokens_per_s"] / full_best["tokens_per_s"],
                              "bw_fraction": full.get("bw_fraction"), "seq_fraction": _seq_fraction(full, llama),
                              "paper": 1.0})
    for policy in ("tova", "window", "sink"):
        for C in (256, 512, 1024, 2048):
            r = find(policy, C, pos=4096, max_batch=True)
            if not r:
                continue
            row = {"policy": policy, "capacity": C, "batch": r["batch"], "tokens_per_s": r["tokens_per_s"],
                   "bw_fraction": r.get("bw_fraction"), "seq_fraction": _seq_fraction(r, llama),
                   "paper": PAPER_RATIO.get(C) if policy == "tova" else None}
            if full_best:
                row["vs_full_best"] = r["tokens_per_s"] / full_best["tokens_per_s"]
            if full:
                row["vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
                row["bound_vs_full"] = (r["batch"] / r["bytes_per_step"]) / (full["batch"] / full["bytes_per_step"])
            out["table1"].append(row)
    for s in hf_max:
        out["table1"].append({"policy": f"transformers {s['cache']}" + (" compiled" if s.get("compiled") else ""),
                              "capacity": "dynamic" if s["cache"] == "dynamic" else 4128, "batch": s["batch"],
                              "tokens_per_s": s["decode4096_tokens_per_s"],
                              "vs_full": s["decode4096_tokens_per_s"] / full["tokens_per_s"] if full else None,
                              "vs_full_best": s["decode4096_tokens_per_s"] / full_best["tokens_per_s"] if full_best else None,
                              "integrated": True})

    t = out["targets"]
    r = find("tova", 512, 1, 4096)
    if r and r.get("bw_fraction") is not None:
        t["batch1_tova512_bw"] = {"value": r["bw_fraction"], "target": TARGETS["batch1_bw"],
                                  "met": r["bw_fraction"] >= TARGETS["batch1_bw"], "step_ms": r["step_ms"],
                                  "bound_step_ms": r.get("bound_step_ms")}
    ratios = []
    for a in rows:
        if a["policy"] != "tova":
            continue
        w = None
        for b in rows:
            if (b["policy"] == "window" and b["capacity"] == a["capacity"] and b["position"] == a["position"]
                    and (b["batch"] == a["batch"] or (a.get("max_batch") and b.get("max_batch")))):
                w = b
                break
        if w:
            # per-token time ratio (largest batches can differ by a few rows)
            ratio = (a["step_ms"] / a["batch"]) / (w["step_ms"] / w["batch"])
            ratios.append({"capacity": a["capacity"], "batch": a["batch"], "window_batch": w["batch"],
                           "position": a["position"], "ratio": ratio})
    if ratios:
        worst = max(ratios, key=lambda x: x["ratio"])
        t["tova_vs_window"] = {"worst": worst, "target": TARGETS["tova_vs_window"],
                               "met": worst["ratio"] <= TARGETS["tova_vs_window"],
                               "n_pairs": len(ratios), "n_over": sum(x["ratio"] > TARGETS["tova_vs_window"] for x in ratios),
                               "pairs": ratios}
    t1 = [x for x in out["table1"] if x.get("bw_fraction") is not None]
    if t1:
        worst = min(t1, key=lambda x: x["bw_fraction"])
        t["table1_bw"] = {"worst": worst, "target": TARGETS["table1_bw"],
                          "met": len(t1) >= TABLE1_CONFIGS and all(x["bw_fraction"] >= TARGETS["table1_bw"] for x in t1),
                          "n_under": sum(x["bw_fraction"] < TARGETS["table1_bw"] for x in t1),
                          "n_measured": len(t1), "n_configs": TABLE1_CONFIGS,
                          "n_under_seq": sum((x.get("seq_fraction") or 0) < TARGETS["table1_bw"] for x in t1)}
    r = find("tova", 512, pos=4096, max_batch=True)
    if r and best_hf:
        ratio = r["tokens_per_s"] / best_hf["decode4096_tokens_per_s"]
        t["tova512_vs_transformers"] = {"value": ratio, "target": TARGETS["vs_hf"], "met": ratio >= TARGETS["vs_hf"],
                                        "ours_tokens_per_s": r["tokens_per_s"], "ours_batch": r["batch"],
                                        "hf_tokens_per_s": best_hf["decode4096_tokens_per_s"],
                                        "hf_cache": best_hf["cache"], "hf_compiled": best_hf.get("compiled"),
                                        "hf_batch": best_hf["batch"]}
        if r.get("bound_step_ms"):  # what the same batch would reach at the full copy bandwidth
            t["tova512_vs_transformers"]["bound_value"] = (
                r["batch"] / (r["bound_step_ms"] / 1e3) / best_hf["decode4096_tokens_per_s"])
    return out


def render(merged: dict) -> str:
    secs = merged.get("sections", {})
    llama = secs.get("llama") or {}
    hf = secs.get("hf") or {}
    info = merged.get("info", {})
    an = merged.get("analysis") or analyse(merged)
    L = []
    L.append(f"# Decode benchmarks — {merged.get('date', '')}\n")
    L.append(f"- command: `{merged.get('command', '')}`")
    cmds = merged.get("commands_supplementary") or (
        [merged["command_supplementary"]] if merged.get("command_supplementary") else [])  # older files
    for i, c in enumerate(cmds, 1):
        L.append(f"- supplementary command {i} (same day, same GPU kind; rows marked †{i} come from it): "
                 f"`{c}`, merged by `python -m benchmarks.merge`")
    L.append(f"- GPU: {info.get('gpu', '?')}; JAX {info.get('jax', '?')} (jaxlib {info.get('jaxlib', '?')}); "
             f"torch {hf.get('torch', '?')}, transformers {hf.get('transformers', '?')}")
    bw = (llama.get("bandwidth") or {})
    mm = (llama.get("matmul") or {})
    if mm:
        L.append(f"- bf16 matrix product ({mm['n']}³, JAX): **{mm['flops_per_s'] / 1e12:.0f} TFLOP/s**")
    if bw:
        L.append(f"- device-to-device copy bandwidth (JAX, (read + written) / time, 4 GiB): "
                 f"**{bw['copy_bytes_per_s'] / 1e12:.2f} TB/s**; read-only pass {bw['read_bytes_per_s'] / 1e12:.2f} TB/s"
                 + (f"; torch copy_ {hf['bandwidth']['copy_bytes_per_s'] / 1e12:.2f} TB/s" if hf.get("bandwidth") else ""))
    L.append("- weights: random bf16 in the model's shapes, made on the device; state bf16 keys/values, "
             "int32 positions, float32 softmax. Decode states are fabricated at the stated position "
             "(`msrnn_jax/testing.py: fabricate_state`) instead of prefilled: a step reads and masks every "
             "slot of the fixed-size buffer, so its cost does not depend on the contents (the probe section "
             "checks positions 0, 4096 and 16384).")
    L.append("- implementation (`impl` column, `fast.attention.StepImpl`): `split:` = `fast.layouts.split_layers(params)` "
             "(per-layer weight arrays, layers unrolled: no weight is sliced or copied per step); `:einsum` = "
             "the query meets the kept slots through XLA's `dot_general`; `:reduce` = XLA multiply + sum; "
             "`:pallas` = `msrnn_jax.fast.kernels`, custom kernels that read each layer's slots in place in the whole "
             "keys and values buffers (XLA's own kernels, at the largest batches, carry a transposed copy of a "
             "buffer and need autotuning scratch the size of one). Where a configuration ran several ways, the "
             "targets and Table 1 take the faster. `scan:` = `lax.scan` over the stacked layers (the library "
             "default on the CPU; XLA copies each layer's weights per step on GPU).")
    L.append("- step time: median over calls of `msrnn_jax.testing.greedy_decode` (16 greedy steps of "
             "`msrnn_jax.core.step.step` in one `lax.scan`, state donated) / 16. "
             "Bandwidth fraction = (weight bytes + state bytes read per step) / step time / copy bandwidth.")
    L.append("")

    # -- targets
    t = an.get("targets", {})
    L.append("## Targets (issue 5)\n")
    L.append("| target | measured | goal | met |")
    L.append("|---|---|---|---|")
    met = lambda x: "yes" if x["met"] else "NO"
    rows = [  # (target key, what, how the measured figure and the goal read)
        ("batch1_tova512_bw", "batch 1, tova C=512, pos 4096, Llama-2-7B: bandwidth fraction",
         lambda x: f"{x['value']:.1%} ({x['step_ms']:.2f} ms/step, bound {x['bound_step_ms']:.2f} ms) | "
                   f"≥ {x['target']:.0%}"),
        ("tova_vs_window", "tova / window time per token, same C and batch",
         lambda x: f"{x['worst']['ratio']:.3f} (C={x['worst']['capacity']}, B={x['worst']['batch']}, pos "
                   f"{x['worst']['position']}); worst of {x['n_pairs']}, {x['n_over']} over | ≤ {x['target']:.2f}"),
        ("table1_bw", "Table 1 configs at their own bandwidth bound",
         lambda x: f"{x['worst']['bw_fraction']:.1%} ({x['worst']['policy']} C={x['worst']['capacity']} "
                   f"B={x['worst']['batch']}); worst of {x['n_measured']} measured ({x['n_configs']} in the grid), "
                   f"{x['n_under']} under"
                   + (f" ({x['n_under_seq']} under at their bandwidth + compute bound)" if "n_under_seq" in x else "")
                   + f" | ≥ {x['target']:.0%}"),
        ("tova512_vs_transformers", "tova C=512 largest batch vs transformers full cache largest batch (decode 4096)",
         lambda x: f"{x['value']:.1f}x ({_f(x['ours_tokens_per_s'], 0)} vs {_f(x['hf_tokens_per_s'], 0)} tok/s, "
                   f"{x['hf_cache']} cache B={x['hf_batch']})"
                   + (f"; at the full copy bandwidth the same batch would give {x['bound_value']:.1f}x"
                      if x.get("bound_value") else "") + f" | ≥ {x['target']:.0f}x"),
    ]
    for key, what, fmt in rows:
        if key in t:
            L.append(f"| {what} | {fmt(t[key])} | {met(t[key])} |")
        else:
            L.append(f"| {what} | not measured in this run (see the notes) | | — |")
    L.append("")

    # -- Table 1
    if an.get("table1"):
        L.append("## Table 1 analog: Llama-2-7B shape, 32-token prompt + 4096 decoded tokens, largest batch\n")
        L.append("Ours: tokens/s = batch / step time (fixed-shape step, so the 4096-step decode costs 4096 equal "
                 "steps; full cache capacity 4128). transformers: per-step time measured at cache lengths "
                 "32…4128 and integrated over the 4096 steps (see the peer section).\n")
        fb = an.get("full_best") or {}
        L.append(f"`× full` divides by `full` at its largest batch; `× best full` by the best `full` figure measured "
                 f"at any batch ({_f(fb.get('tokens_per_s'), 0)} tokens/s at batch {fb.get('batch')}, "
                 f"{fb.get('variant')}), the conservative ratio.\n")
        L.append("`bandwidth + compute fraction`: the same bytes at the copy bandwidth plus the step's matrix-product "
                 "FLOPs at the bf16 matmul rate measured in the same run, over the step time (the step's kernels "
                 "run one after another, and at these batches the weight products are compute-bound).\n")
        L.append("| policy | C | max batch | tokens/s | × full | × best full | bandwidth-bound × full | paper × full (V100) | bandwidth fraction | bandwidth + compute fraction |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in an["table1"]:
            L.append(f"| {r['policy']} | {r['capacity']} | {r['batch']} | {_f(r['tokens_per_s'], 0)} | "
                     f"{_f(r.get('vs_full'))} | {_f(r.get('vs_full_best'))} | {_f(r.get('bound_vs_full'))} | "
                     f"{_f(r.get('paper'), 1)} | {_pct(r.get('bw_fraction'))} | {_pct(r.get('seq_fraction'))} |")
        L.append("")

    # -- decode grids
    for key, title in (("llama", "Llama-2-7B shape (MHA, 32 KV heads)"), ("mistral", "Mistral-7B shape (GQA, 8 KV heads)")):
        part = secs.get(key)
        rows = _decode_rows(part)
        if not rows:
            continue
        L.append(f"## Decode step, {title}\n")
        L.append("| policy | C | batch | position | step ms | tokens/s | GB read/step | TB/s | bw fraction | TFLOP/s | bw + compute fraction | compile s | exe peak GiB | impl |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["policy"] != "full", r["policy"], r["capacity"], r["batch"], r["position"])):
            L.append(f"| {r['policy']}{_dagger(r)} | {r['capacity']} | "
                     f"{r['batch']}{' (max)' if r.get('max_batch') else ''} | "
                     f"{r['position']} | {r['step_ms']:.2f} | {_f(r['tokens_per_s'], 0)} | "
                     f"{r['bytes_per_step'] / 1e9:.2f} | {r['achieved_bytes_per_s'] / 1e12:.2f} | "
                     f"{_pct(r.get('bw_fraction'))} | "
                     f"{r['achieved_tflops']:.0f} | {_pct(_seq_fraction(r, part))} | {r.get('compile_s', 0):.1f} | "
                     f"{r.get('exe_peak_bytes', 0) / 2 ** 30:.1f} | {r.get('variant') or ''} |")
        mem = (part.get("memory_end") or {})
        if mem.get("peak_bytes_in_use"):
            L.append(f"\nProcess peak device memory (JAX memory_stats): {mem['peak_bytes_in_use'] / 2 ** 30:.1f} GiB "
                     f"of {mem.get('bytes_limit', 0) / 2 ** 30:.1f} GiB.")
        errs = part.get("errors") or []
        if errs:
            L.append(f"\n{len(errs)} configuration(s) failed: " + "; ".join(
                f"{e.get('policy')} C={e.get('capacity')} B={e.get('batch')} {e.get('stage')}{' (OOM)' if e.get('oom') else ''}"
                for e in errs[:12]))
        if part.get("skipped"):
            L.append(f"\nSkipped for time: {part['skipped']}")
        L.append("")

    # -- peer
    if hf.get("runs"):
        L.append("## transformers peer (same GPU, same shape, sdpa, bf16, greedy)\n")
        L.append("| cache | batch | step ms at cache length (tokens/s) | decode-4096 tokens/s (integrated) |")
        L.append("|---|---|---|---|")
        for s in hf["runs"]:
            pts = ", ".join(f"{int(p['cache_len'])}: {p['step_ms']:.1f} ({p['tokens_per_s']:.0f})" for p in s["points"])
            L.append(f"| {s['cache']}{' + torch.compile' if s.get('compiled') else ''} | {s['batch']}"
                     f"{' (max)' if s.get('largest_batch') else ''} | {pts} | {_f(s['decode4096_tokens_per_s'], 0)} |")
        if hf.get("errors"):
            L.append("\nPeer errors / out-of-memory retries: " + "; ".join(
                f"{e.get('cache')} B={e.get('batch')}{' OOM' if e.get('oom') else ''}" for e in hf["errors"][:10]))
        L.append("")

    # -- prefill
    pre = secs.get("prefill") or {}
    if pre.get("prefill"):
        L.append("## Prefill (Llama-2-7B shape, batch 1)\n")
        L.append("| mode | policy | C | prompt tokens | run s | tokens/s | ms/token | compile s |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in pre["prefill"]:
            comp = r.get("compile_s", r.get("compile_s_approx"))
            L.append(f"| {r['mode']}{'' if not r.get('chunk') else ' S=' + str(r['chunk'])}"
                     f"{_dagger(r)} | {r['policy']} | "
                     f"{r['capacity']} | {r['prompt_tokens']} | {r['run_s']:.3f} | {_f(r['tokens_per_s'], 0)} | "
                     f"{r['ms_per_token']:.3f} | {_f(comp, 1)} |")
        L.append("")

    # -- probes
    for key in ("probe", "probe2"):
        pr = secs.get(key) or {}
        if not (pr.get("decode") or pr.get("profile")):
            continue
        env = (merged.get("section_status") or {}).get(key, {}).get("env") or {}
        L.append(f"## Probe{'' if key == 'probe' else ' 2'}: step implementation variants, HLO and kernel profile "
                 f"(Llama-2-7B shape){' — env ' + str(env) if env else ''}\n")
        L.append("Variants: `loop:attention` — scan = `lax.scan` over stacked layers; unroll = Python loop, "
                 "static slices of the stacked weights; split = Python loop over per-layer weight arrays "
                 "(`fast.layouts.split_layers`, no weight slicing); `:nobar` = no optimization barrier between "
                 "unrolled layers.\n")
        L.append("| variant | policy | C | batch | position | step ms | tokens/s | bw fraction | compile s | temp GiB |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        bwp = ((secs.get("llama") or {}).get("bandwidth") or {}).get("copy_bytes_per_s")
        for r in pr.get("decode", []):
            frac = r["bytes_per_step"] / (r["step_ms"] / 1e3) / bwp if bwp else None
            L.append(f"| {r.get('variant')} | {r['policy']} | {r['capacity']} | {r['batch']} | {r['position']} | "
                     f"{r['step_ms']:.2f} | {_f(r['tokens_per_s'], 0)} | {_pct(frac)} | {r.get('compile_s', 0):.1f} | "
                     f"{r.get('temp_bytes', 0) / 2 ** 30:.2f} |")
        for p in pr.get("profile", []):
            L.append(f"\nProfile {p['variant']} {p['policy']} C={p['capacity']} B={p['batch']} ({p['n_steps']} steps):"
                     + (f" {p['error']}" if "error" in p else ""))
            for ln in p.get("lines", []):
                L.append(f"- line `{ln['line']}`: {ln['events']} events, busy {ln['busy_ms']:.2f} ms of "
                         f"{ln['span_ms']:.2f} ms span")
                for k in ln["top"][:8]:
                    L.append(f"  - `{k['name'][:90]}` ×{k['count']}: {k['total_ms']:.2f} ms (mean {k['mean_us']:.1f} µs)")
        for p in pr.get("probe", []):
            big = [b for b in p.get("hlo_large_buffers", [])
                   if b["op"] in ("copy", "fusion-done") or "remat" in b["name"] or "dynamic-slice" in b["name"]]
            L.append(f"\nHLO {p['variant']} {p['policy']} B={p['batch']}: {p['hlo_copy_count']} copy instructions; "
                     f"{len(big)} large copies / async slices / remats: "
                     + (", ".join(f"{b['name']} {b['shape']}" for b in big[:6]) or "none"))
        L.append("")
    if merged.get("notes"):
        L.append(merged["notes"])
    return "\n".join(L) + "\n"
