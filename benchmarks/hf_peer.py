"""The peer: Hugging Face transformers' PyTorch `generate` on the same GPU and shapes.

The model is `LlamaForCausalLM` / `MistralForCausalLM` built from a config (random bf16
weights, `attn_implementation="sdpa"`), greedy, `min_new_tokens = max_new_tokens` so it
never stops early. Two caches: the default `DynamicCache` (grows by concatenation) and a
`StaticCache` sized for the whole run (eager, `disable_compile=True`; optionally also
with transformers' automatic `torch.compile`).

Per-step times come from a logits processor that synchronises the GPU and reads the
clock at every step (the first call follows the prefill). A full 4096-token decode at
the largest batch would take minutes per configuration, so the Table 1 figure for the
peer is *integrated*: step time is measured (16 new tokens) at cache lengths spread over
[32, 4128], interpolated linearly in the cache length and summed over the 4096 steps of
a 32-token-prompt, 4096-token decode. The JSON keeps every raw step time.

    python -m benchmarks.hf_peer --json part.json [--model llama2-7b] [--deadline EPOCH]

With `--serve SPEC.json` it is instead `benchmarks.serve`'s transformers system, in a
process of its own (serve.py starts it once its JAX systems have exited): continuous
batching (`generate_batch`) over the request set SPEC describes, offline (and, if asked,
a prefill-only run of the same requests, one token each, and the online arrivals), its
record written to --json.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
import warnings

import numpy as np

from msrnn_jax.config import PRESETS

from .common import write_json

PROMPT = 32
DECODE_LEN = 4096
GiB = 1024 ** 3


def build_model(name: str, device: str, dtype=None):
    import torch
    import transformers
    spec = PRESETS[name]
    common = dict(vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
                  intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
                  num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"],
                  head_dim=spec["head_dim"], rms_norm_eps=spec["rms_norm_eps"],
                  max_position_embeddings=max(8192, spec.get("max_position_embeddings", 0)),
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if spec["family"] == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    elif spec["family"] == "qwen3":
        cfg = transformers.Qwen3Config(rope_theta=spec["rope_theta"], **common)
        cls = transformers.Qwen3ForCausalLM
    elif spec["family"] == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(rope_theta=spec["rope_theta"], num_experts=spec["num_experts"],
                                          num_experts_per_tok=spec["experts_per_token"],
                                          moe_intermediate_size=spec["moe_intermediate_size"],
                                          norm_topk_prob=spec["norm_topk_prob"], **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif spec["family"] == "gemma3_text":
        n = spec["num_layers"]
        cfg = transformers.Gemma3TextConfig(
            rope_theta=spec["rope_theta"], rope_local_base_freq=spec["rope_local_theta"],
            rope_scaling={"rope_type": spec["rope_scaling"][0], "factor": spec["rope_scaling"][1]},
            sliding_window=spec["sliding_window"], query_pre_attn_scalar=int(spec["query_pre_attn_scalar"]),
            layer_types=["sliding_attention" if i in spec["sliding_layers"] else "full_attention" for i in range(n)],
            **{**common, "tie_word_embeddings": True})
        cls = transformers.Gemma3ForCausalLM
    else:
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    dtype = dtype or torch.bfloat16
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Clock:
    """LogitsProcessor that records a synchronised timestamp at every generation step."""

    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores):
        _sync()
        self.t.append(time.perf_counter())
        return scores


def _static_cache(model, max_cache_len):
    from transformers import StaticCache
    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:  # older signature
        import torch
        return StaticCache(config=model.config, max_batch_size=None, max_cache_len=max_cache_len,
                           device=model.device, dtype=torch.bfloat16)


def timed_generate(model, batch, prompt_len, new_tokens, cache="dynamic", static_cache=None,
                   compile_=False, seed=0):
    """One generate call; returns the prefill time and every decode step's time."""
    import torch
    from transformers import LogitsProcessorList
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g).to(model.device)
    clock = _Clock()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              logits_processor=LogitsProcessorList([clock]), attention_mask=torch.ones_like(ids))
    if cache == "static":
        static_cache.reset()
        kw["past_key_values"] = static_cache
        kw["disable_compile"] = not compile_
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kw)
    _sync()
    t1 = time.perf_counter()
    assert out.shape[1] == prompt_len + new_tokens, out.shape
    del out, ids
    steps = np.diff(clock.t).tolist()
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "cache": cache,
            "compiled": compile_, "prefill_s": clock.t[0] - t0, "total_s": t1 - t0, "step_s": steps,
            # the first decode step after the prefill can carry one-off costs: drop it
            "step_s_median": float(np.median(steps[1:] if len(steps) > 2 else steps))}


def integrate(points, prompt=PROMPT, n=DECODE_LEN):
    """Total time of an n-step decode from `prompt`, interpolating the measured median step
    time linearly in the cache length (points: [(cache_len, step_s)])."""
    pts = sorted(points)
    xs = np.array([p[0] for p in pts], float)
    ys = np.array([p[1] for p in pts], float)
    lens = prompt + np.arange(n, dtype=float)
    return float(np.interp(lens, xs, ys).sum())


def _is_oom(e):
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def _cleanup():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_bandwidth_torch(nbytes=4 * GiB, reps=20):
    import torch
    a = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    _cleanup()
    t = float(np.median(ts))
    return {"bytes": nbytes, "copy_s": t, "copy_bytes_per_s": 2 * nbytes / t}


def sweep(model, batch, cache, lens, new_tokens, compile_=False, max_cache_len=None):
    """Generate at each prompt length in `lens`; returns the runs (raises on OOM)."""
    static = _static_cache(model, max_cache_len) if cache == "static" else None
    runs = []
    try:
        for P in lens:
            runs.append(timed_generate(model, batch, P, new_tokens, cache, static, compile_))
    finally:
        del static
        _cleanup()
    return runs


def summarise(runs, batch, cache, compile_):
    pts = [(r["prompt_len"] + r["new_tokens"] / 2, r["step_s_median"]) for r in runs]
    total = integrate(pts)
    return {"batch": batch, "cache": cache, "compiled": compile_,
            "points": [{"cache_len": x, "step_ms": 1e3 * y, "tokens_per_s": batch / y} for x, y in pts],
            "decode4096_s": total, "decode4096_tokens_per_s": batch * DECODE_LEN / total,
            "prefill_s": {r["prompt_len"]: r["prefill_s"] for r in runs},
            "runs": runs}


def serve_peer(spec: dict, device: str | None = None, save=None) -> dict:
    """`benchmarks.serve`'s transformers system on the request set of `spec` (see
    serve.hf_spec): one model; `generate_batch` over the requests (or the slice `range`),
    before it the same requests with one new token each (`prefill_only`, if `phases`),
    then the online arrivals (if asked). A failure is kept in the record, not raised.
    Also the memory free after the weights and the batch whose full cache would fit there
    at the longest request (`batch_estimate`, 0.9 of it; None on a CPU). `save(result)`
    is called after each run."""
    import torch
    import transformers

    from .serve import arrival_sets, hf_offline, hf_online, requests
    warnings.filterwarnings("ignore", category=FutureWarning)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    p = PRESETS[spec["model"]]
    lo, hi = spec["prompt"]
    prompts = requests(spec["requests"], lo, hi, p["vocab_size"])
    a, b = spec.get("range") or (0, len(prompts))
    import os
    res = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device, "record": {},
           "pid": os.getpid()}
    rec = res["record"]
    save = save or (lambda r: None)
    try:
        t0 = time.perf_counter()
        model = build_model(spec["model"], device)
        rec["build_s"] = time.perf_counter() - t0
        if device == "cuda":
            res["gpu"] = torch.cuda.get_device_name(0)
            free = torch.cuda.mem_get_info()[0]
            row = 2 * p["num_layers"] * p["num_kv_heads"] * p["head_dim"] * 2 * (hi + spec["gen"])
            res["free_bytes_after_model"], res["batch_estimate"] = free, max(1, int(0.9 * free // row))
        else:
            res["batch_estimate"] = None
        args = (spec["model"], prompts[a:b])
        tail = (device, spec["batch_tokens"], spec.get("extra") or {})
        if "offline" in spec["modes"]:
            if spec.get("phases", True):
                rec["prefill_only"] = hf_offline(*args, 1, *tail, model=model)
                print("transformers prefill only", rec["prefill_only"], flush=True)
                save(res)
            rec["offline"] = hf_offline(*args, spec["gen"], *tail, model=model)
            if spec.get("range"):
                rec["offline"]["range"] = [a, b]
            print("transformers offline", rec["offline"], flush=True)
            save(res)
        if "online" in spec["modes"] and spec.get("rates"):
            arrivals = arrival_sets(spec["rates"], spec["online_requests"])
            rec["online"] = hf_online(spec["model"], prompts[:spec["online_requests"]], spec["gen"], *tail, arrivals,
                                      model=model)
            rec["online_config"] = {"max_batch_tokens": spec["batch_tokens"], **(spec.get("extra") or {})}
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--json", required=True)
    ap.add_argument("--serve", metavar="SPEC_JSON", default=None,
                    help="run benchmarks.serve's transformers system on the request set SPEC_JSON "
                         "describes (serve.py writes it and starts this)")
    ap.add_argument("--deadline", type=float, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lens", default="32,1056,2080,3104,4112",
                    help="prompt lengths at which step time is measured")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--caches", default="dynamic,static")
    ap.add_argument("--compile", action="store_true", help="also static cache + torch.compile")
    ap.add_argument("--max-batch-start", type=int, default=None)
    ap.add_argument("--max-batch-cap", type=int, default=None)
    ap.add_argument("--reserve-bytes", type=int, default=6 * GiB)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.serve:
        import json
        with open(args.serve) as f:
            res = serve_peer(json.load(f), save=lambda r: write_json(args.json, r))
        write_json(args.json, res)
        return res
    import torch
    import transformers
    res = {"section": "hf", "model": args.model, "argv": sys.argv, "runs": [], "errors": [], "skipped": [],
           "torch": torch.__version__, "transformers": transformers.__version__, "started": time.time()}

    def save():
        res["elapsed_s"] = time.time() - res["started"]
        write_json(args.json, res)

    def left():
        return float("inf") if args.deadline is None else args.deadline - time.time()

    lens = [int(x) for x in args.lens.split(",")]
    max_len = PROMPT + DECODE_LEN
    if lens[-1] + args.new_tokens < max_len:
        max_len = lens[-1] + args.new_tokens
    cuda = args.device == "cuda" and torch.cuda.is_available()
    try:
        if cuda:
            res["gpu"] = torch.cuda.get_device_name(0)
            res["bandwidth"] = copy_bandwidth_torch()
        t0 = time.perf_counter()
        model = build_model(args.model, args.device if cuda else "cpu")
        res["build_s"] = time.perf_counter() - t0
        res["attn_implementation"] = model.config._attn_implementation
        spec = PRESETS[args.model]
        row = 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"] * 2 * max(max_len, PROMPT + DECODE_LEN)
        # prefill temporaries per row at the longest prompt (hidden states, MLP activations)
        row += lens[-1] * (6 * spec["hidden_size"] + 6 * spec["intermediate_size"])
        if cuda:
            free = torch.cuda.mem_get_info()[0]
            est = int((free - args.reserve_bytes) // row)
        else:
            free, est = None, 2
        res["memory_free_after_model"] = free
        res["row_bytes_estimate"] = row
        save()
        configs = []
        for cache in args.caches.split(","):
            if cache and cache != "none":
                configs.append((cache, False))
        if args.compile:
            configs.append(("static", True))
        for cache, comp in configs:
            for which in ("one", "max"):
                if left() < 40:
                    res["skipped"].append({"cache": cache, "compiled": comp, "batch": which, "reason": "deadline"})
                    continue
                if which == "one":
                    B = 1
                else:
                    B = args.max_batch_start or est
                    if args.max_batch_cap:
                        B = min(B, args.max_batch_cap)
                for attempt in range(6):
                    try:
                        # the longest prompt first: an out-of-memory shows at once
                        runs = sweep(model, B, cache, lens[::-1], args.new_tokens, comp, max_len)
                        s = summarise(runs[::-1], B, cache, comp)
                        s["largest_batch"] = which == "max"
                        s["attempt"] = attempt
                        res["runs"].append(s)
                        break
                    except Exception as e:
                        _cleanup()
                        if which == "max" and _is_oom(e) and B > 1:
                            res["errors"].append({"cache": cache, "batch": B, "oom": True, "error": repr(e)[:300]})
                            B = max(1, int(B * 0.9))
                            continue
                        res["errors"].append({"cache": cache, "batch": B, "compiled": comp, "error": repr(e)[:500],
                                              "trace": traceback.format_exc()[-2000:]})
                        break
                save()
    except Exception as e:
        res["errors"].append({"stage": "section", "error": repr(e)[:1000], "trace": traceback.format_exc()[-3000:]})
    save()
    return res


if __name__ == "__main__":
    main()
