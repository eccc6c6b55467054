"""Fitting the benchmarks into the device's time limits; none of it measures anything.

  * `Deadline` and `compile_then_run`: a section compiles its configurations ahead of
    time, in parallel, within a share of its time, then runs them one by one while its
    deadline allows, listing what it skipped;
  * `assign_lanes` / `run_lanes`: sections onto GPUs, one process per GPU at a time, each
    section with its share of the budget, the parts merged after each (`merge_parts`);
  * `resume_plan`: what a result cut short still owes (`decode --resume`);
  * `merge_runs`: a supplementary run merged into a main result (`decode --resume`,
    `python -m benchmarks.merge`), every row keeping its provenance.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .common import write_json
from .report import analyse, markdown_path, render


class Deadline:
    def __init__(self, epoch: float | None):
        self.epoch = epoch

    def left(self) -> float:
        return float("inf") if self.epoch is None else self.epoch - time.time()

    def ok(self, need: float = 0.0) -> bool:
        return self.left() > need


def compile_then_run(jobs, build, deadline: Deadline, workers: int, alone, share: float, need, on_compiled=None):
    """Build (compile) every job before any is run: the first alone (a compile time without
    contention), the rest `workers` at a time, those with alone(job) one at a time beside
    them. Compiling may take `share` of the time left; what has not started by then is
    cancelled, and what has is waited for (autotuning must not run beside a timed call).
    Then yields (job, skip_reason, future) in job order: skip_reason is "deadline
    (compile)" for a cancelled build, "deadline" when fewer than need(job) seconds are left,
    else None (future.result() is the build). on_compiled() is called once the compile
    phase is over, before anything runs."""
    with ThreadPoolExecutor(max(1, workers)) as pool, ThreadPoolExecutor(1) as pool_alone:
        futures = [pool.submit(build, jobs[0])] if jobs else []
        if futures:
            futures[0].exception()  # wait
        futures += [(pool_alone if alone(j) else pool).submit(build, j) for j in jobs[1:]]
        stop = time.time() + share * deadline.left() if deadline.epoch else None
        for f in futures:
            try:
                f.result(timeout=None if stop is None else max(0.0, stop - time.time()))
            except Exception:
                pass
        for f in futures:
            f.cancel()
        for f in futures:
            if not f.cancelled():
                f.exception()
        if on_compiled:
            on_compiled()
        for job, fut in zip(jobs, futures):
            if fut.cancelled() or not deadline.ok(need(job)):
                yield job, "deadline" + (" (compile)" if fut.cancelled() else ""), fut
            else:
                yield job, None, fut


# -- sections onto GPUs ----------------------------------------------------------------
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


def merge_parts(work: str, command: str, date: str, names) -> dict:
    """The per-section parts in `work` (part-<name>.json) as one result."""
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


def write_result(json_path: str, merged: dict, md_path: str | None = None) -> None:
    write_json(json_path, merged)
    with open(md_path or markdown_path(json_path), "w") as f:
        f.write(render(merged))


def run_lanes(lanes, weights, budget_s, section_cmd, env, sec_env, cwd, work, on_part):
    """Run each lane's sections in order, one lane per GPU (CUDA_VISIBLE_DEVICES when
    there are several), each section with its share (by weight) of the time left to
    its lane; section_cmd(name, part_path, deadline) is its command; on_part(status)
    is called, under a lock, after every section."""
    end = time.time() + budget_s
    status: dict = {}
    lock = threading.Lock()

    def run_lane(gpu: int, names: list[str]):
        for i, name in enumerate(names):
            share = (end - time.time()) * weights[name] / sum(weights[s] for s in names[i:])
            cmd = section_cmd(name, os.path.join(work, f"part-{name}.json"), time.time() + share)
            lane_env = {**env, **sec_env.get(name, {})}
            if len(lanes) > 1:
                lane_env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            print(f"== [gpu {gpu}] section {name}: {share:.0f} s  ({' '.join(cmd[2:])})", flush=True)
            t0 = time.time()
            try:
                rc = subprocess.run(cmd, env=lane_env, cwd=cwd, timeout=max(30.0, share + 45.0)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            print(f"== [gpu {gpu}] section {name}: rc={rc} in {time.time() - t0:.0f} s", flush=True)
            with lock:
                status[name] = {"rc": rc, "seconds": round(time.time() - t0, 1), "env": sec_env.get(name, {}),
                                "gpu": gpu if len(lanes) > 1 else None}
                on_part(status)

    threads = [threading.Thread(target=run_lane, args=(g, names)) for g, names in enumerate(lanes) if names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return status


# -- resuming and merging --------------------------------------------------------------
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


def _gkey(r):
    return (r.get("model"), r["policy"], r["capacity"], "max" if r.get("max_batch") else r["batch"],
            r.get("variant"))


def merge_runs(main: dict, supp: dict, tag: str = "supplementary 1") -> dict:
    """SUPP's rows replace MAIN's with the same (model, policy, capacity, batch or "max",
    step implementation), marked "run": tag; MAIN's failures of configurations SUPP
    measured are dropped; every row's bandwidth fraction is recomputed against MAIN's
    Llama-section copy bandwidth (the 4 GiB measurement)."""
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


def merge_files(main_path: str, supp_paths, out_path: str, notes: str | None = None) -> dict:
    """MAIN merged with each SUPP in turn (numbered after the runs MAIN holds already),
    NOTES appended; written to out_path and its Markdown beside it."""
    with open(main_path) as f:
        merged = json.load(f)
    merged["analysis"] = analyse(merged)
    done = len(merged.get("commands_supplementary") or [])
    for i, path in enumerate(supp_paths, done + 1):
        with open(path) as f:
            merged = merge_runs(merged, json.load(f), f"supplementary {i}")
    if notes:
        with open(notes) as f:
            merged["notes"] = f.read()
    with open(out_path, "w") as f:
        json.dump(merged, f, indent=1)
    with open(markdown_path(out_path), "w") as f:
        f.write(render(merged))
    return merged
