"""Merge a supplementary run into a main results file (when the device budget forced a
second, shorter command), keeping every row's provenance, and re-render the Markdown.

    python -m benchmarks.merge MAIN.json SUPP.json OUT.json [--replace policy/C/max ...]

Rows of SUPP replace rows of MAIN with the same (model, policy, capacity, batch or
"max", step implementation); every supplementary row carries "run": "supplementary", and
MAIN's failures of configurations that SUPP measured are dropped. Bandwidth
fractions of every row are recomputed against MAIN's Llama-section copy bandwidth (the
4 GiB measurement).
"""

from __future__ import annotations

import argparse
import json

from .report import analyse, render


def _gkey(r):
    return (r.get("model"), r["policy"], r["capacity"], "max" if r.get("max_batch") else r["batch"],
            r.get("variant"))


def merge(main: dict, supp: dict) -> dict:
    out = json.loads(json.dumps(main))
    bw = (main["sections"]["llama"].get("bandwidth") or {}).get("copy_bytes_per_s")
    for name, part in supp["sections"].items():
        if name not in out["sections"]:
            out["sections"][name] = part
            continue
        if part.get("started") == out["sections"][name].get("started"):
            continue  # the same part (a warm machine kept it)
        dst = out["sections"][name]
        new = []
        for r in part.get("decode", []):
            r = dict(r, run="supplementary")
            if bw and r.get("bytes_per_step"):
                r["bw_fraction"] = r["bytes_per_step"] / (r["step_ms"] / 1e3) / bw
                r["bound_step_ms"] = 1e3 * r["bytes_per_step"] / bw
            new.append(r)
        groups = {_gkey(r) for r in new}
        dst["decode"] = [r for r in dst.get("decode", []) if _gkey(r) not in groups] + new
        modes = {p["mode"] for p in part.get("prefill", [])}
        dst["prefill"] = [p for p in dst.get("prefill", []) if p["mode"] not in modes] + \
            [dict(p, run="supplementary") for p in part.get("prefill", [])]
        done = {(r["policy"], r["capacity"], "max" if r.get("max_batch") else r["batch"]) for r in new}
        done |= {("prefill", m) for m in modes}
        dst["errors"] = [e for e in dst.get("errors", [])  # measured now: no longer a failure
                         if (e.get("policy"), e.get("capacity"), e.get("batch")) not in done
                         and ("prefill", e.get("prefill")) not in done]
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
    out["command_supplementary"] = supp.get("command")
    out["analysis"] = analyse(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("main")
    ap.add_argument("supp")
    ap.add_argument("out")
    ap.add_argument("--notes", default=None, help="a Markdown file appended to the report")
    args = ap.parse_args(argv)
    with open(args.main) as f:
        main_ = json.load(f)
    with open(args.supp) as f:
        supp = json.load(f)
    merged = merge(main_, supp)
    if args.notes:
        with open(args.notes) as f:
            merged["notes"] = f.read()
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    with open(args.out[:-5] + ".md", "w") as f:
        f.write(render(merged))


if __name__ == "__main__":
    main()
