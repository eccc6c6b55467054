"""GPU decode benchmarks beside Hugging Face transformers and the hardware limit (issue 5).

One command runs every section, each in its own process (so JAX and PyTorch never hold
device memory at the same time), and after each section rewrites

    <out>/decode-<date>.json   every raw figure, the command, date, versions, GPU
    <out>/decode-<date>.md     the tables and the targets, met or missed

Sections (default: llama, mistral, hf, prefill). With several GPUs the sections are spread
over them (--gpus; each section to the GPU with the least work so far, by --weights), one
process per GPU at a time; each section gets its GPU's share of --budget-s and stops
starting work after its deadline, listing what it skipped:
  llama    decode grid, Llama-2-7B shape (jax_bench.DEFAULT_JOBS, in priority order): full and
           tova/window/sink x C in 256..2048, batch 1, 8, 32 and the largest that fits,
           positions 4096 and 16384; its largest-batch rows are the Table 1 analog. Every
           configuration runs `model.split_layers` params (unrolled layers: no weight is
           sliced); all are compiled first, in parallel, then timed one by one
  mistral  the same grid in the Mistral-7B (GQA) shape, position 4096
  hf       transformers generate: dynamic cache, and static cache + torch.compile;
           batch 1 and the largest batch (probed down on out-of-memory)
  prefill  exact / oneshot / chunked prefill of a 4096-token prompt (tova, C=512)
  probe, probe2   (not default) step-implementation variants with the optimised HLO's large
           buffers and a jax.profiler kernel summary; probe2 is for trying XLA_FLAGS (--env)

Usage (on the GPU machine, from the repository root):

    PYTHONPATH=. python -m benchmarks.decode --out benchmarks/results

`--quick` runs a tiny model on whatever device there is (a CPU rehearsal of the whole pipeline).

A run cut short by its budget lists what it skipped. The same command with `--resume <out>/decode-<date>.json`
runs only those configurations and merges them into that file (its rows marked †N, the command listed);
repeat until nothing is skipped.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tarfile
import threading
import time

from .common import now_tag, write_json
from .report import analyse, markdown_path, render

SECTIONS = ("probe", "probe2", "llama", "hf", "prefill", "mistral")
DEFAULT_SECTIONS = ("llama", "mistral", "hf", "prefill")
WEIGHTS = {"probe": 1.2, "probe2": 1.0, "llama": 5.4, "hf": 2.8, "prefill": 1.3, "mistral": 4.0}


def section_cmd(name: str, part: str, deadline: float, quick: bool, dump_dir: str, extra: dict) -> list[str]:
    py = [sys.executable, "-m"]
    dl = ["--deadline", f"{deadline:.0f}"]
    if quick:
        tiny = ["--model", "tiny"]
        if name in ("probe", "probe2"):
            return py + ["benchmarks.jax_bench", "--section", "probe", "--json", part, *tiny, "--n-steps", "2",
                         "--reps", "1", "--probe-batch", "4", "--hlo-min-bytes", "4096", *dl]
        if name in ("llama", "mistral"):
            jobs = "full/F/1,full/F/max,tova/16/1,tova/16/2,tova/16/max,window/16/1,window/16/max"
            return py + ["benchmarks.jax_bench", "--section", "decode", "--json", part, *tiny, "--n-steps", "2",
                         "--reps", "2", "--jobs", jobs if name == "llama" else "tova/16/1,window/16/1",
                         "--positions", "40,100", "--full-capacity", "64", "--reserve-bytes", "0",
                         "--max-batch-cap", "8", "--bw-bytes", "4000000", "--matmul-n", "128", "--variant", "split:einsum",
                         "--compile-workers", "2", *extra.get(name, []), *dl]
        if name == "prefill":
            return py + ["benchmarks.jax_bench", "--section", "prefill", "--json", part, *tiny, "--prefill-tokens", "64",
                         "--prefill-capacity", "16", "--chunk", "16", *extra.get(name, []), *dl]
        if name == "hf":
            return py + ["benchmarks.hf_peer", "--json", part, *tiny, "--device", "cpu", "--lens", "4,8",
                         "--new-tokens", "3", "--caches", "dynamic", *dl]
    if name in ("probe", "probe2"):
        return py + ["benchmarks.jax_bench", "--section", "probe", "--json", part, "--model", "llama2-7b",
                     "--dump-dir", os.path.join(dump_dir, name), *extra.get(name, []), *dl]
    if name == "llama":
        return py + ["benchmarks.jax_bench", "--section", "decode", "--json", part, "--model", "llama2-7b",
                     "--variant", "split:einsum", *extra.get("llama", []), *dl]
    if name == "mistral":
        return py + ["benchmarks.jax_bench", "--section", "decode", "--json", part, "--model", "mistral-7b",
                     "--variant", "split:einsum", "--positions", "4096", *extra.get("mistral", []), *dl]
    if name == "prefill":
        return py + ["benchmarks.jax_bench", "--section", "prefill", "--json", part, "--model", "llama2-7b",
                     "--variant", "split:einsum", *extra.get("prefill", []), *dl]
    if name == "hf":
        return py + ["benchmarks.hf_peer", "--json", part, "--model", "llama2-7b", "--caches", "dynamic",
                     "--compile", "--lens", "32,1392,2752,4112", *extra.get("hf", []), *dl]
    raise ValueError(name)


def count_gpus() -> int:
    """GPUs on this machine (nvidia-smi -L), 0 without one."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def assign_lanes(todo: list[str], weights: dict, n: int) -> list[list[str]]:
    """Sections onto n GPUs (each lane runs its sections in order): each section, in the
    given order, goes to the lane with the least weight so far."""
    lanes: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for name in todo:
        i = min(range(n), key=lambda k: load[k])
        lanes[i].append(name)
        load[i] += weights[name]
    return lanes


def merge(work: str, command: str, date: str, names=SECTIONS) -> dict:
    secs = {}
    for name in names:
        p = os.path.join(work, f"part-{name}.json")
        if os.path.exists(p):
            with open(p) as f:
                secs[name] = json.load(f)
    info = {}
    for s in secs.values():
        if s.get("info"):
            info.update({"jax": s["info"].get("jax"), "jaxlib": s["info"].get("jaxlib"),
                         "gpu": s["info"].get("device_kind"), "platform": s["info"].get("platform"),
                         "xla_flags": s["info"].get("xla_flags")})
            break
    if "hf" in secs:
        info.update({"torch": secs["hf"].get("torch"), "transformers": secs["hf"].get("transformers"),
                     "gpu_torch": secs["hf"].get("gpu")})
    merged = {"date": date, "command": command, "info": info, "sections": secs}
    merged["analysis"] = analyse(merged)
    return merged


def resume_plan(prev: dict, todo: list[str], extra: dict) -> tuple[list[str], dict]:
    """What a run still owes to a previous result: (sections to run, their extra args).
    A decode section absent from `prev` runs whole; one present runs only the
    configurations it skipped (as --jobs), or not at all. prefill reruns its skipped
    modes; hf and the probes run only if absent."""
    extra = {k: list(v) for k, v in extra.items()}
    secs = prev.get("sections", {})
    out = []
    for name in todo:
        part = secs.get(name)
        if part is None:
            out.append(name)
            continue
        skipped = part.get("skipped") or []
        if name in ("llama", "mistral"):
            jobs = [f"{s['policy']}/{s['capacity']}/{s['batch']}" + (f"@{s['variant']}" if s.get("variant") else "")
                    for s in skipped if "policy" in s]
            if jobs:
                if "--jobs" in extra.get(name, []):
                    raise SystemExit(f"--resume chooses the {name} jobs; do not pass --jobs in --extra")
                extra[name] = [*extra.get(name, []), "--jobs", ",".join(jobs)]
                out.append(name)
        elif name == "prefill":
            modes = [s["prefill"] for s in skipped if "prefill" in s]
            if modes:
                extra[name] = [*extra.get(name, []), "--prefill-modes", ",".join(modes)]
                out.append(name)
        elif name == "hf" and skipped:
            out.append(name)
    return out, extra


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default=None, help="folder for per-section parts (default: <out>/.parts)")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=560.0, help="wall-clock budget for all sections")
    ap.add_argument("--date", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, seconds (smoke test)")
    ap.add_argument("--extra", default="{}", help='JSON {section: [extra args]} passed to a section')
    ap.add_argument("--weights", default="{}", help='JSON {section: weight}: shares of the budget')
    ap.add_argument("--env", default="{}", help='JSON {section: {VAR: value}}: extra environment')
    ap.add_argument("--gpus", type=int, default=0,
                    help="GPUs to spread the sections over, one process per GPU at a time (default: all)")
    ap.add_argument("--resume", default=None, metavar="RESULT.json",
                    help="run only what RESULT skipped (see resume_plan) and merge it into RESULT "
                         "(rows marked as a supplementary run); repeat until nothing is skipped")
    args = ap.parse_args(argv)
    date = args.date or now_tag()
    command = "PYTHONPATH=. python -m benchmarks.decode " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    os.makedirs(args.out, exist_ok=True)
    work = args.work or os.path.join(args.out, ".parts")
    os.makedirs(work, exist_ok=True)
    dump_dir = os.path.join(work, "dump")
    for d in ("probe", "probe2"):
        os.makedirs(os.path.join(dump_dir, d), exist_ok=True)
    sec_env = json.loads(args.env)
    extra = json.loads(args.extra)
    weights = {**WEIGHTS, **json.loads(args.weights)}
    todo = [s for s in args.sections.split(",") if s]
    for s in todo:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}")
    prev = None
    if args.resume:
        try:
            with open(args.resume) as f:
                prev = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"--resume: cannot read {args.resume}: {e}")
        todo, extra = resume_plan(prev, todo, extra)
        if not todo:
            print(f"{args.resume}: nothing skipped, nothing to run")
            return args.resume, markdown_path(args.resume)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    end = time.time() + args.budget_s
    status = {}
    json_path = os.path.join(args.out, f"decode-{date}.json")
    md_path = os.path.join(args.out, f"decode-{date}.md")
    if prev is not None:  # this run's own result stays in the work folder; merged at the end
        json_path, md_path = os.path.join(work, "resumed-run.json"), os.path.join(work, "resumed-run.md")
    lock = threading.Lock()
    n_gpus = args.gpus if args.gpus else count_gpus()
    lanes = assign_lanes(todo, weights, max(1, n_gpus))

    def run_lane(gpu: int, names: list[str]):
        for i, name in enumerate(names):
            left = end - time.time()
            share = left * weights[name] / sum(weights[s] for s in names[i:])
            deadline = time.time() + share
            part = os.path.join(work, f"part-{name}.json")
            cmd = section_cmd(name, part, deadline, args.quick, dump_dir, extra)
            lane_env = {**env, **sec_env.get(name, {})}
            if len(lanes) > 1:
                lane_env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            print(f"== [gpu {gpu}] section {name}: {share:.0f} s  ({' '.join(cmd[2:])})", flush=True)
            t0 = time.time()
            try:
                rc = subprocess.run(cmd, env=lane_env, cwd=root, timeout=max(30.0, share + 45.0)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            print(f"== [gpu {gpu}] section {name}: rc={rc} in {time.time() - t0:.0f} s", flush=True)
            with lock:
                status[name] = {"rc": rc, "seconds": round(time.time() - t0, 1), "env": sec_env.get(name, {}),
                                "gpu": gpu if len(lanes) > 1 else None}
                merged = merge(work, command, date, SECTIONS if prev is None else todo)
                merged["section_status"] = status
                merged["lanes"] = lanes
                write_json(json_path, merged)
                with open(md_path, "w") as f:
                    f.write(render(merged))

    threads = [threading.Thread(target=run_lane, args=(g, names)) for g, names in enumerate(lanes) if names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dumps = sorted(glob.glob(os.path.join(dump_dir, "*", "*")))
    if dumps:
        with tarfile.open(os.path.join(args.out, f"hlo-{date}.tar.gz"), "w:gz") as tar:
            for p in dumps:
                tar.add(p, arcname=os.path.relpath(p, dump_dir))
    if prev is not None:
        from .merge import merge as merge_runs
        with open(json_path) as f:
            run = json.load(f)
        n = len(prev.get("commands_supplementary") or []) + 1
        merged = merge_runs(prev, run, f"supplementary {n}")
        json_path, md_path = args.resume, markdown_path(args.resume)
        write_json(json_path, merged)
        with open(md_path, "w") as f:
            f.write(render(merged))
    print(open(md_path).read())
    return json_path, md_path


if __name__ == "__main__":
    main()
