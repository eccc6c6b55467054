"""Merge a supplementary run into a main results file (when the device budget forced a
second, shorter command), keeping every row's provenance, and re-render the Markdown.

    python -m benchmarks.merge MAIN.json [SUPP.json ...] --out OUT.json [--notes NOTES.md]

Rows of SUPP replace rows of MAIN with the same (model, policy, capacity, batch or
"max", step implementation); every supplementary row carries "run": "supplementary", and
MAIN's failures of configurations that SUPP measured are dropped. Bandwidth
fractions of every row are recomputed against MAIN's Llama-section copy bandwidth (the
4 GiB measurement).
"""

from __future__ import annotations

import argparse
import json

from .report import analyse, markdown_path, render


def _gkey(r):
    return (r.get("model"), r["policy"], r["capacity"], "max" if r.get("max_batch") else r["batch"],
            r.get("variant"))


def merge(main: dict, supp: dict, tag: str = "supplementary 1") -> dict:
    out = json.loads(json.dumps(main))
    bw = ((main["sections"].get("llama") or {}).get("bandwidth") or {}).get("copy_bytes_per_s")
    for name, part in supp["sections"].items():
        if name not in out["sections"]:
            out["sections"][name] = part
            continue
        if part.get("started") == out["sections"][name].get("started"):
            continue  # the same part (a warm machine kept it)
        dst = out["sections"][name]
        if part.get("matmul") and not dst.get("matmul"):  # same GPU kind, same day
            dst["matmul"] = part["matmul"]
        new = [dict(r, run=tag) for r in part.get("decode", [])]  # bandwidth fractions: below
        groups = {_gkey(r) for r in new}
        dst["decode"] = [r for r in dst.get("decode", []) if _gkey(r) not in groups] + new
        modes = {p["mode"] for p in part.get("prefill", [])}
        dst["prefill"] = [p for p in dst.get("prefill", []) if p["mode"] not in modes] + \
            [dict(p, run=tag) for p in part.get("prefill", [])]
        done = {(r["policy"], r["capacity"], "max" if r.get("max_batch") else r["batch"]) for r in new}
        done |= {("prefill", m) for m in modes}
        ekey = lambda e: (e.get("policy"), e.get("capacity"), "max" if e.get("max_batch") else e.get("batch"))
        dst["errors"] = [e for e in dst.get("errors", [])  # measured now: no longer a failure
                         if ekey(e) not in done and ("prefill", e.get("prefill")) not in done]
        failed = [dict(e, run=tag) for e in part.get("errors", []) if ekey(e) not in done]
        dst["errors"] += failed
        done |= {ekey(e) for e in failed}  # attempted, so not skipped
        dst["skipped"] = [s for s in dst.get("skipped", [])
                          if (s.get("policy"), s.get("capacity"), s.get("batch")) not in done
                          and ("prefill", s.get("prefill")) not in done]
        dst.setdefault("supplementary", []).append({k: part.get(k) for k in ("argv", "errors", "skipped",
                                                                               "memory_end", "bandwidth")})
    # one bandwidth for every row: the main run's 4 GiB copy measurement
    for part in out["sections"].values():
        for r in part.get("decode", []):
            if bw and r.get("bytes_per_step"):
                r["bw_fraction"] = r["bytes_per_step"] / (r["step_ms"] / 1e3) / bw
                r["bound_step_ms"] = 1e3 * r["bytes_per_step"] / bw
    out.setdefault("commands_supplementary", []).append(supp.get("command"))
    out["analysis"] = analyse(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("main")
    ap.add_argument("supp", nargs="*", help="none: only re-render MAIN (with --notes)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--notes", default=None, help="a Markdown file appended to the report")
    args = ap.parse_args(argv)
    with open(args.main) as f:
        main_ = json.load(f)
    merged = main_
    merged["analysis"] = analyse(merged)
    done = len(merged.get("commands_supplementary") or [])  # MAIN may hold merged runs already
    for i, path in enumerate(args.supp, done + 1):
        with open(path) as f:
            merged = merge(merged, json.load(f), f"supplementary {i}")
    if args.notes:
        with open(args.notes) as f:
            merged["notes"] = f.read()
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    with open(markdown_path(args.out), "w") as f:
        f.write(render(merged))


if __name__ == "__main__":
    main()
