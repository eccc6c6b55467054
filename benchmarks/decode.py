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
           configuration runs `fast.layouts.split_layers` params (unrolled layers: no weight is
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
repeat until nothing is skipped (`--plan` prints what it would run). The scheduling (lanes, deadlines,
resume, merge) lives in schedule.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sys
import tarfile

from . import schedule
from .common import now_tag
from .report import markdown_path

SECTIONS = ("probe", "probe2", "llama", "hf", "prefill", "mistral")
DEFAULT_SECTIONS = ("llama", "mistral", "hf", "prefill")
WEIGHTS = {"probe": 1.2, "probe2": 1.0, "llama": 5.4, "hf": 2.8, "prefill": 1.3, "mistral": 4.0}

_DECODE, _PREFILL, _PROBE = (["benchmarks.jax_bench", "--section", s] for s in ("decode", "prefill", "probe"))
# section -> (module and section, the args for the GPU run, the args for --quick)
_QUICK_DECODE = ["--model", "tiny", "--n-steps", "2", "--reps", "2", "--positions", "40,100",
                 "--full-capacity", "64", "--reserve-bytes", "0", "--max-batch-cap", "8", "--bw-bytes", "4000000",
                 "--matmul-n", "128", "--variant", "split:einsum", "--compile-workers", "2"]
_QUICK_PROBE = ["--model", "tiny", "--n-steps", "2", "--reps", "1", "--probe-batch", "4",
                "--hlo-min-bytes", "4096"]
_COMMANDS = {
    "probe": (_PROBE, ["--model", "llama2-7b"], _QUICK_PROBE),
    "probe2": (_PROBE, ["--model", "llama2-7b"], _QUICK_PROBE),
    "llama": (_DECODE, ["--model", "llama2-7b", "--variant", "split:einsum"],
              _QUICK_DECODE + ["--jobs", "full/F/1,full/F/max,tova/16/1,tova/16/2,tova/16/max,window/16/1,window/16/max"]),
    "mistral": (_DECODE, ["--model", "mistral-7b", "--variant", "split:einsum", "--positions", "4096"],
                _QUICK_DECODE + ["--jobs", "tova/16/1,window/16/1"]),
    "prefill": (_PREFILL, ["--model", "llama2-7b", "--variant", "split:einsum"],
                ["--model", "tiny", "--prefill-tokens", "64", "--prefill-capacity", "16", "--chunk", "16"]),
    "hf": (["benchmarks.hf_peer"], ["--model", "llama2-7b", "--caches", "dynamic", "--compile", "--lens", "32,1392,2752,4112"],
           ["--model", "tiny", "--device", "cpu", "--lens", "4,8", "--new-tokens", "3", "--caches", "dynamic"]),
}


def section_cmd(name: str, part: str, deadline: float, quick: bool, dump_dir: str, extra: dict) -> list[str]:
    """The command of one section (a process of its own) writing its part to `part`."""
    module, gpu_args, quick_args = _COMMANDS[name]
    if name in ("probe", "probe2"):
        # the quick probe takes no extra args; the GPU probes dump their HLO
        more = [] if quick else ["--dump-dir", os.path.join(dump_dir, name), *extra.get(name, [])]
    else:
        more = [] if quick and name == "hf" else extra.get(name, [])
    return [sys.executable, "-m", *module, "--json", part, *(quick_args if quick else gpu_args), *more,
            "--deadline", f"{deadline:.0f}"]


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
                    help="run only what RESULT skipped (see schedule.resume_plan) and merge it into RESULT "
                         "(rows marked as a supplementary run); repeat until nothing is skipped")
    ap.add_argument("--plan", action="store_true",
                    help="print the sections that would run and their extra args as JSON, run nothing")
    args = ap.parse_args(argv)
    date = args.date or now_tag()
    command = "PYTHONPATH=. python -m benchmarks.decode " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
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
        todo, extra = schedule.resume_plan(prev, todo, extra)
    if args.plan:
        print(json.dumps({"sections": todo, "extra": extra}))
        return None
    if prev is not None and not todo:
        print(f"{args.resume}: nothing skipped, nothing to run")
        return args.resume, markdown_path(args.resume)
    os.makedirs(args.out, exist_ok=True)
    work = args.work or os.path.join(args.out, ".parts")
    dump_dir = os.path.join(work, "dump")
    for d in ("probe", "probe2"):
        os.makedirs(os.path.join(dump_dir, d), exist_ok=True)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    json_path = os.path.join(args.out, f"decode-{date}.json")
    md_path = os.path.join(args.out, f"decode-{date}.md")
    if prev is not None:  # this run's own result stays in the work folder; merged at the end
        json_path, md_path = os.path.join(work, "resumed-run.json"), os.path.join(work, "resumed-run.md")
    lanes = schedule.assign_lanes(todo, weights, max(1, args.gpus or schedule.count_gpus()))

    def on_part(status):
        merged = schedule.merge_parts(work, command, date, SECTIONS if prev is None else todo)
        merged["section_status"] = status
        merged["lanes"] = lanes
        schedule.write_result(json_path, merged, md_path)

    schedule.run_lanes(lanes, weights, args.budget_s,
                       lambda name, part, deadline: section_cmd(name, part, deadline, args.quick, dump_dir, extra),
                       env, sec_env, root, work, on_part)
    dumps = sorted(glob.glob(os.path.join(dump_dir, "*", "*")))
    if dumps:
        with tarfile.open(os.path.join(args.out, f"hlo-{date}.tar.gz"), "w:gz") as tar:
            for p in dumps:
                tar.add(p, arcname=os.path.relpath(p, dump_dir))
    if prev is not None:
        with open(json_path) as f:
            run = json.load(f)
        n = len(prev.get("commands_supplementary") or []) + 1
        json_path, md_path = args.resume, markdown_path(args.resume)
        schedule.write_result(json_path, schedule.merge_runs(prev, run, f"supplementary {n}"), md_path)
    print(open(md_path).read())
    return json_path, md_path


if __name__ == "__main__":
    main()
