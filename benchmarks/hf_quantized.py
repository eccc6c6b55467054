"""transformers' quantized KV cache on the tokens of the 8-bit state's quality table.

`benchmarks.quantized_table` gives the perplexity of msrnn's int8 and fp8 states against its
float32 state. This runs transformers' own answer to the same question, `QuantizedCache`, on
the same model (the embedded GGUF file, which transformers dequantizes to the same float32
weights) and the same tokens (the first `--tokens` of each book, msrnn's tokenizer): every
token is fed one at a time through the cache, so each prediction reads the stored keys and
values, as `msrnn ppl` reads its state. Backends, where they are installed:

- `fp8`: float8_e4m3fn, one scale per tensor, frozen after the first token (transformers);
- `quanto` int4 and int2 (optimum-quanto), `hqq` int8 and int4 (hqq): groups of 64 along the
  head dimension, the most recent 128 tokens kept in full precision (`residual_length`).

Beside them, transformers' float32 `DynamicCache` on the same tokens: the base of each delta,
and a check that both models are one (its NLL equals `msrnn ppl --policy full`'s).

    python -m benchmarks.hf_quantized --out benchmarks/results/quantized/hf
    python -m benchmarks.quantized_table benchmarks/results/quantized --hf benchmarks/results/quantized/hf

Each book gives BOOK.jsonl: one line per cache with its mean NLL and perplexity. A backend
whose package is missing is listed in the line `skipped` with the package to install.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

# (name, backend, nbits, the module the backend needs)
CACHES = [("float32", None, None, None), ("fp8", "fp8", None, None), ("quanto int4", "quanto", 4, "optimum.quanto"),
          ("quanto int2", "quanto", 2, "optimum.quanto"), ("hqq int8", "hqq", 8, "hqq"), ("hqq int4", "hqq", 4, "hqq")]
PIP = {"optimum.quanto": "optimum-quanto", "hqq": "hqq"}  # the distribution that installs each module
BOOKS = ("pg_news_from_nowhere", "pg_jack_sheppard")


def installed(module: str | None) -> bool:
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package missing
        return False


def make_cache(model, backend: str | None, nbits: int | None):
    from transformers import DynamicCache, QuantizedCache

    if backend is None:
        return DynamicCache(config=model.config)
    return QuantizedCache(backend, model.config, **({} if nbits is None else {"nbits": nbits}))


def stepwise_nll(model, ids, backend: str | None = None, nbits: int | None = None) -> np.ndarray:
    """The NLL of tokens 1..T-1 of ids [T], each token fed alone through the cache."""
    import torch

    cache = make_cache(model, backend, nbits)
    out = []
    with torch.no_grad():
        for t in range(len(ids) - 1):
            x = torch.tensor([[int(ids[t])]])
            logits = model(x, past_key_values=cache, use_cache=True,
                           cache_position=torch.tensor([t])).logits[0, -1].float()
            out.append(float(torch.logsumexp(logits, -1) - logits[int(ids[t + 1])]))
    return np.asarray(out)


def run_book(model, ids, caches, log=print) -> list[dict]:
    rows = []
    for name, backend, nbits, need in caches:
        if not installed(need):
            rows.append({"cache": name, "skipped": f"needs {need} (pip install {PIP[need]})"})
            log(json.dumps(rows[-1]))
            continue
        t0 = time.perf_counter()
        nll = stepwise_nll(model, ids, backend, nbits)
        rows.append({"cache": name, "backend": backend or "dynamic", "nbits": nbits, "tokens": len(ids),
                     "mean_nll": float(nll.mean()), "ppl": math.exp(float(nll.mean())),
                     "seconds": time.perf_counter() - t0})
        log(json.dumps(rows[-1]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for BOOK.jsonl")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    ap.add_argument("--books", default=",".join(BOOKS))
    ap.add_argument("--caches", default=",".join(c[0] for c in CACHES), help="names from CACHES")
    ap.add_argument("--model", default=None, help="an HF folder (default: the embedded GGUF file)")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from msrnn_jax.run import api

    names = [c.strip() for c in args.caches.split(",")]
    unknown = [n for n in names if n not in {c[0] for c in CACHES}]
    if unknown:
        print(f"error: unknown caches {unknown}; choose from {[c[0] for c in CACHES]}", file=sys.stderr)
        return 2
    caches = [c for c in CACHES if c[0] in names]
    ours = api.load_model(args.model)
    if args.model is None:
        from msrnn_jax.convert import default_model_path
        gguf = default_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                               dtype=torch.float32).eval()
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.hf_quantized " + " ".join(sys.argv[1:] if argv is None else argv),
            "torch": torch.__version__, "transformers": transformers.__version__, "model": ours.source}
    for book in args.books.split(","):
        ids = api.text_rows(ours, [api.read_text(args.data / f"{book}.txt")], args.tokens, 1)[0]
        print(f"# {book}: {len(ids)} tokens", flush=True)
        rows = run_book(hf, ids, caches)
        (args.out / f"{book}.jsonl").write_text("".join(json.dumps({**r, "book": book, **meta}) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
