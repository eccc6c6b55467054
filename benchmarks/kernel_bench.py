"""The step's two products with the state, alone: XLA's einsum beside the Pallas kernels
(`msrnn_jax.fast.kernels`) in their variants, at the shapes of the decode benchmarks' largest
batches. Reports each kernel's time per call and the state bytes it reads per second, as
a fraction of the device-to-device copy bandwidth measured in the same run.

    python -m benchmarks.kernel_bench --json kernels.json [--cases ...] [--variants ...] [--state-dtype int8]

A case is name:B:Hkv:G:C (D = 128). A variant is `xla`, or `vpu/Cb/warps`, `mma/Cb/warps` or
`auto/Cb/warps` (Cb: slots per program, 0 = kernels.slot_block; warps: Triton num_warps,
0 = the kernels' default; vpu = multiply-and-sum in f32, mma = tensor-core products with
f32 accumulation, auto = the kernels' own choice). The `xla` figures are not comparable:
XLA merges the repeated products that share the state into one (it reads it once).
One jitted call runs the kernel `--repeat` times on distinct queries (nothing to fold),
timed as the median of `--reps` calls. `--state-dtype int8|fp8` stores the keys and values
as the 8-bit state does (`Quantized`: codes and a float32 scale per slot; the bytes read
count both), the first variant's output the reference of the others.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from msrnn_jax.core.state import Quantized
from msrnn_jax.fast import kernels

from .common import GiB, copy_bandwidth, device_info, median_seconds, now_tag, write_json
from .report import markdown_path

F32 = jnp.float32
DEFAULT_CASES = "llama-C256-B912:912:32:1:256,llama-C512-B456:456:32:1:512,mistral-C512-B1792:1792:8:4:512"
DEFAULT_VARIANTS = "auto/0/0,vpu/0/0,vpu/64/2,mma/0/4,mma/128/8,mma/0/8"


def _kernel_fns(variant: str, layer: int):
    """(scores(q, K), mix(w, V)) for a variant; K and V are [2, B, H, C, D] buffers."""
    if variant == "xla":
        def read(X):
            return X[layer].dequantize(jnp.bfloat16) if isinstance(X, Quantized) else X[layer]
        return (lambda q, K: jnp.einsum("bhgd,bhcd->bhgc", q, read(K), preferred_element_type=F32),
                lambda w, V: jnp.einsum("bhgc,bhcd->bhgd", w, read(V), preferred_element_type=F32))
    kind, cb, warps = variant.split("/")
    opts = {"block": int(cb) or None, "mma": {"vpu": False, "mma": True}.get(kind), "warps": int(warps) or None}
    if kind not in ("vpu", "mma", "auto"):
        raise ValueError(f"unknown variant {variant!r}")
    return (functools.partial(kernels.slot_scores, layer=layer, **opts),
            functools.partial(kernels.slot_mix, layer=layer, **opts))


def _repeated(fn, repeat: int):
    @jax.jit
    def run(x, buf):
        return [fn(x * (1.0 + i / 64), buf) for i in range(repeat)]
    return run


def bench_case(case: str, variants: list[str], repeat: int, reps: int, bw: float, state_dtype="bfloat16") -> dict:
    name, B, H, G, C = case.split(":")
    B, H, G, C, D = int(B), int(H), int(G), int(C), 128
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    K = jax.random.normal(k1, (2, B, H, C, D), jnp.bfloat16)
    V = jax.random.normal(k2, (2, B, H, C, D), jnp.bfloat16)
    q = jax.random.normal(k3, (B, H, G, D), jnp.bfloat16)
    w = jax.nn.softmax(jax.random.normal(k4, (B, H, G, C), F32), -1).astype(jnp.bfloat16)
    layer_bytes = B * H * C * D * 2
    if state_dtype in ("int8", "fp8"):
        K, V = (jax.jit(Quantized.of, static_argnums=1)(X, state_dtype) for X in (K, V))
        layer_bytes = B * H * C * (D + 4)  # the codes and each slot's float32 scale
    ref_s = ref_m = None
    rows = []
    for variant in variants:
        row = {"variant": variant}
        try:
            scores, mix = _kernel_fns(variant, 1)
            s_out, m_out = scores(q, K), mix(w, V)
            if ref_s is None:
                ref_s, ref_m = s_out, m_out
            row["max_abs_diff"] = [float(jnp.max(jnp.abs(s_out - ref_s))), float(jnp.max(jnp.abs(m_out - ref_m)))]
            for what, fn, x, buf in (("scores", scores, q, K), ("mix", mix, w, V)):
                t = median_seconds(_repeated(fn, repeat), x, buf, reps=reps) / repeat
                row[f"{what}_us"] = t * 1e6
                row[f"{what}_bw_frac"] = layer_bytes / t / bw
        except Exception as e:  # a variant Triton cannot lower is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(row)
        print(name, row, file=sys.stderr, flush=True)
    del K, V
    return {"case": name, "batch": B, "kv_heads": H, "group": G, "capacity": C, "head_dim": D,
            "state_dtype": state_dtype,
            "layer_state_bytes": layer_bytes, "rows": rows}


def render(out: dict) -> str:
    """The Markdown table of a kernel_bench result."""
    bw = out["bandwidth"]["copy_bytes_per_s"]
    L = [f"# State-product kernels alone — {out.get('date', '')}\n",
         f"- command: `{out['command']}`",
         (f"- GPU: {out['device'].get('device_kind', '?')}; JAX {out['jax']}; copy bandwidth {bw / 1e12:.2f} TB/s "
          f"((read + written) / time); fraction = one layer's keys or values bytes / kernel time / copy bandwidth "
          f"(a read-only kernel can pass 100%)"),
         ("- `auto`: the kernels' own choice (tensor cores when G >= 2); `vpu`: f32 multiply-and-sum; `mma`: "
          "tensor-core products, query rows padded to 16; `/Cb/warps`: slots per program (0 = `slot_block`), "
          "Triton num_warps (0 = default)\n")]
    for c in out["cases"]:
        L.append(f"## {c['case']}: B={c['batch']}, Hkv={c['kv_heads']}, G={c['group']}, C={c['capacity']}, "
                 f"D={c['head_dim']}, {c.get('state_dtype', 'bfloat16')} "
                 f"({c['layer_state_bytes'] / 1e9:.2f} GB per layer and buffer)\n")
        L.append("| variant | scores µs | scores fraction | mix µs | mix fraction | max abs diff vs first |")
        L.append("|---|---|---|---|---|---|")
        for r in c["rows"]:
            if "error" in r:
                L.append(f"| {r['variant']} | error: {r['error'][:120]} | | | | |")
                continue
            L.append(f"| {r['variant']} | {r['scores_us']:.0f} | {r['scores_bw_frac']:.1%} | {r['mix_us']:.0f} | "
                     f"{r['mix_bw_frac']:.1%} | {max(r['max_abs_diff']):.1e} |")
        L.append("")
    if out.get("notes"):
        L.append(out["notes"])
    return "\n".join(L) + "\n"


def _write(path: str, out: dict) -> None:
    write_json(path, out)
    with open(markdown_path(path), "w") as f:
        f.write(render(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bw-bytes", type=int, default=4 * GiB, help="bytes of the copy-bandwidth measurement")
    ap.add_argument("--state-dtype", default="bfloat16", choices=["bfloat16", "int8", "fp8"],
                    help="how the keys and values are stored (int8 / fp8: 8-bit codes and a scale per slot)")
    args = ap.parse_args(argv)
    bw = copy_bandwidth(args.bw_bytes)
    out = {"command": " ".join(["python -m benchmarks.kernel_bench", *(sys.argv[1:] if argv is None else argv)]),
           "date": now_tag(), "device": device_info(), "jax": jax.__version__, "bandwidth": bw, "cases": []}
    for case in args.cases.split(","):
        out["cases"].append(bench_case(case, args.variants.split(","), args.repeat, args.reps,
                                       bw["copy_bytes_per_s"], args.state_dtype))
        _write(args.json, out)
    _write(args.json, out)


if __name__ == "__main__":
    main()
