"""Long-context evaluation: does the bounded state keep what a question asks for?
(docs/design.md §11, `msrnn eval passkey|niah`.)

Two synthetic tasks, generated from a seed, measured in the model's own prompt tokens:

* `passkey`: a random 5-digit key inside repeated filler text, then "What is the pass key?";
* `niah`: RULER's needle, "One of the special magic numbers for {word} is: {number}.",
  inside real text (a haystack file; the filler by default), then the question.

    import msrnn_jax as m
    model = m.load_model()
    for rec in m.evaluate_task(model, "passkey", ["full", "window", "tova"], [128],
                               lengths=[1024], depths=[0.1, 0.9], samples=2):
        print(rec.policy, rec.capacity, rec.depth, rec.accuracy)

Prompts are built from token ids, not from text: the instruction, the haystack's
sentences (each encoded once, with its leading space), the needle and the question are
encoded separately and concatenated, so a prompt has exactly the asked number of tokens,
the needle's tokens are the ones it has alone (intact), and it starts at the sentence
boundary nearest to the asked depth of the haystack.

The answer is a few greedy tokens; a sample scores 1 when the expected number appears in
it. The policies of one capacity run side by side as batch rows (`PerRow`), every prompt
of a length once per policy; `full` runs once per length.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from ..core.policies import Policy, policy_name
from ..errors import InvalidArgument, MsrnnError, check_choice, check_float, check_int
from .spec import fused_runs, grid

if TYPE_CHECKING:
    from .api import Model

TASKS = ("passkey", "niah")
EVAL_PREFILL_MODES = ("exact", "chunked")

# The passkey task of Landmark Attention / LongLoRA (Mohtashami & Jaggi 2023).
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the important information there.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key?"
PASSKEY_ANSWER = "The pass key is"

# RULER's niah_single (Hsieh et al. 2024), with a 7-digit number.
NIAH_PREFIX = ("Some special magic numbers are hidden within the following text. Make sure to "
               "memorize it. I will quiz you about the numbers afterwards.")
NIAH_NEEDLE = " One of the special magic numbers for {word} is: {key}."
NIAH_QUESTION = " What is the special magic number for {word} mentioned in the provided text?"
NIAH_ANSWER = "The special magic number for {word} mentioned in the provided text is"
NIAH_WORDS = ("apple", "river", "violin", "lantern", "meadow", "harbor", "falcon", "pepper",
              "marble", "canyon", "willow", "copper", "saddle", "orchid", "thunder", "glacier",
              "pillow", "cobalt", "walnut", "ribbon", "compass", "tulip", "anchor", "velvet",
              "badger", "cinder", "quartz", "maple", "jasmine", "kettle", "summit", "oyster")

ANSWER_TOKENS = {"passkey": 8, "niah": 12}  # digits are one token each in most tokenizers
CHAT_EXTRA_TOKENS = 8  # a chat answer may restate the question before the number


@dataclasses.dataclass(frozen=True)
class TaskPrompt:
    """One sample: `ids` (exactly `length` tokens) and the `expected` answer string.
    The needle is ids[needle_start : needle_start + needle_len]; the haystack (filler)
    is ids[hay_start : hay_start + hay_len], the needle excluded."""

    task: str
    length: int
    depth: float
    sample: int
    ids: tuple
    expected: str
    needle_start: int
    needle_len: int
    hay_start: int
    hay_len: int


class Haystack:
    """Sentences of a text, each encoded once (with its leading space) by the model's
    tokenizer: the material prompts are cut from."""

    def __init__(self, model: Model, text: str | None = None, source: str = "filler"):
        if text is None:
            sentences = list(FILLER)
        else:
            flat = " ".join(text.split())  # hard line breaks of a book are not sentences
            sentences = [s for s in re.split(r"(?<=[.!?])\s+", flat) if s.strip()]
        if not sentences:
            raise MsrnnError(f"the haystack {source} has no text")
        self.source = source
        enc = model._tok()([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
        self.sentences = [list(ids) for ids in enc if len(ids)]
        self.max_sentence = max(len(s) for s in self.sentences)

    @classmethod
    def from_file(cls, model: Model, path: str | Path) -> Haystack:
        from .api import read_text

        return cls(model, read_text(path), str(path))

    def take(self, n: int, start: int) -> tuple[list[int], list[int]]:
        """n tokens of whole sentences from sentence `start` on (cycling), the last one cut
        to fit. Returns (ids, the sentence boundaries within them: 0, ..., n)."""
        ids: list[int] = []
        bounds = [0]
        i = start
        while len(ids) < n:
            ids.extend(self.sentences[i % len(self.sentences)])
            bounds.append(min(len(ids), n))
            i += 1
        return ids[:n], sorted(set(bounds))


def _ids(model: Model, text: str) -> list[int]:
    """Token ids of a piece of a prompt, without the special tokens a tokenizer adds."""
    return list(model._tok()(text, add_special_tokens=False)["input_ids"])


def _chat_frame(model: Model) -> tuple[list[int], list[int]]:
    """The chat template's token ids before and after a single user message's content
    (generation prompt included), so the content can be built from token ids."""
    mark = "\u2063MSRNN\u2063"
    tok = model._tok()
    if not getattr(tok, "chat_template", None):
        raise MsrnnError(f"the model {model.source} has no chat template")
    text = tok.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True,
                                   tokenize=False)
    head, tail = text.split(mark)
    return _ids(model, head), _ids(model, tail)


def _parts(model: Model, task: str, rng: np.random.Generator, chat: bool):
    """(instruction ids, needle ids, question + answer-prefix ids, expected string)."""
    if task == "passkey":
        key = str(int(rng.integers(10000, 100000)))
        prefix, needle = PASSKEY_PREFIX, PASSKEY_NEEDLE.format(key=key)
        question, answer = PASSKEY_QUESTION, PASSKEY_ANSWER
    else:
        word = NIAH_WORDS[int(rng.integers(len(NIAH_WORDS)))]
        key = str(int(rng.integers(1_000_000, 10_000_000)))
        prefix, needle = NIAH_PREFIX, NIAH_NEEDLE.format(word=word, key=key)
        question, answer = NIAH_QUESTION.format(word=word), NIAH_ANSWER.format(word=word)
    if chat:
        head, tail = _chat_frame(model)
        pre = head + _ids(model, prefix)
        post = _ids(model, question) + tail + _ids(model, answer)
    else:
        pre = model.encode(prefix)  # the tokenizer's default: a BOS where it adds one
        post = _ids(model, question + " " + answer)
    return pre, _ids(model, needle), post, key


def fixed_tokens(model: Model, task: str, chat: bool = False) -> int:
    """Prompt tokens that are not haystack (instruction, needle, question), for sample 0."""
    task = check_choice("task", task, TASKS)
    pre, needle, post, _ = _parts(model, task, np.random.default_rng(0), chat)
    return len(pre) + len(needle) + len(post)


def make_prompt(model: Model, task: str, length: int, depth: float, sample: int = 0, seed: int = 0,
                haystack: Haystack | None = None, chat: bool = False) -> TaskPrompt:
    """Sample `sample` of `task` at `length` prompt tokens with the needle at relative
    `depth` of the haystack (0: right after the instruction, 1: right before the question).

    The key (and, for niah, the word and where in the haystack the text starts) depend
    only on (seed, sample), so one sample is the same question at every length and depth."""
    task = check_choice("task", task, TASKS)
    length = check_int("lengths", length)
    depth = check_float("depths", depth, 0.0, 1.0)
    rng = np.random.default_rng([check_int("seed", seed, minimum=0), check_int("sample", sample, minimum=0)])
    pre, needle, post, key = _parts(model, task, rng, chat)
    hay = haystack or Haystack(model)
    start = 0 if hay.source == "filler" else int(rng.integers(len(hay.sentences)))
    n_hay = length - len(pre) - len(needle) - len(post)
    if n_hay < 0:
        raise InvalidArgument(f"length {length} is shorter than the {task} prompt without any haystack "
                              f"(instruction, needle and question: {length - n_hay} tokens)", "lengths")
    ids, bounds = hay.take(n_hay, start)
    at = min(bounds, key=lambda b: (abs(b - depth * n_hay), b))  # the nearest sentence boundary
    prompt = pre + ids[:at] + needle + ids[at:] + post
    assert len(prompt) == length
    return TaskPrompt(task, length, depth, sample, tuple(prompt), key, len(pre) + at, len(needle),
                      len(pre), n_hay)


def score_answer(answer: str, expected: str) -> int:
    """1 if the expected string appears in the answer, else 0."""
    return int(expected in answer)


# the columns of `msrnn eval --csv` (the record's fields but its answers)
CSV_KEYS = ["task", "policy", "capacity", "positions", "length", "depth", "samples", "correct", "accuracy"]


@dataclasses.dataclass
class EvalRecord:
    """The accuracy of one (task, policy, capacity, length, depth) over its samples."""

    task: str
    policy: str
    capacity: int
    length: int
    depth: float
    samples: int
    accuracy: float
    answers: list = dataclasses.field(default_factory=list)   # decoded answer of each sample
    expected: list = dataclasses.field(default_factory=list)  # the expected string of each
    prefill: str = "exact"
    positions: str = "absolute"  # docs/design.md §8
    shared_with: int = 1  # policies that ran side by side as batch rows
    seconds: float = 0.0  # wall-clock of the runs this record's rows were part of

    def as_dict(self) -> dict:
        """The JSON object of `msrnn eval --json` (with each sample's answer and expected string)."""
        return {**dataclasses.asdict(self), "correct": round(self.accuracy * self.samples)}


def _values(values, name):
    vals = [values] if isinstance(values, (int, float, str, Policy)) else list(values)
    if not vals:
        raise InvalidArgument(f"{name} needs at least one value", name)
    return vals


def check_eval(task, policies, capacities=(), depths=(0.0,), samples=1, seed=0, prefill="exact",
               chunk=None, batch=None, sinks=4, positions="absolute", state_dtype=None):
    """Every argument of `evaluate_task` that does not need the model, checked once (the
    command line calls this before it loads the model). Returns them normalised:
    (task, the runs as validated `RunSpec`s (`spec.grid`), depths, samples, seed, batch)."""
    task = check_choice("task", task, TASKS)
    names = policies if isinstance(policies, str) else _values(policies, "policy")
    specs = grid(names, [check_int("capacity", c) for c in capacities], sinks, prefill, chunk, positions,
                 EVAL_PREFILL_MODES, state_dtype)
    depths = list(dict.fromkeys(check_float("depths", d, 0.0, 1.0) for d in _values(depths, "depths")))
    samples = check_int("samples", samples)
    seed = check_int("seed", seed, minimum=0)
    if batch is not None:
        batch = check_int("batch", batch)
    return task, specs, depths, samples, seed, batch


def evaluate_task(model: Model, task: str, policies: Sequence[str | Policy], capacities: Sequence[int] = (),
                  lengths: Sequence[int] = (1024,), depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                  samples: int = 4, seed: int = 0, haystack: str | Path | None = None,
                  prefill: str = "exact", chunk: int | None = None, batch: int | None = None,
                  chat: bool = False, sinks: int = 4, fuse: bool = True,
                  progress: Callable[[int], None] | None = None,
                  positions: str = "absolute", state_dtype: str | None = None) -> Iterator[EvalRecord]:
    """Accuracy of every policy at every capacity (`full` once per length) on `task`, for
    every length x depth, over `samples` samples each. Every argument is checked before
    any work; records are yielded as each run ends.

    batch: prompts per run (default: every prompt of a length); with `fuse` (exact
    prefill) each run holds batch x (bounded policies) rows, one per prompt and policy.
    `progress(n)` is told the prompt tokens each run read. positions: "absolute" or
    "reindex" (docs/design.md §8), for prompt and answer alike."""
    from .decoding import generate_tokens

    task, specs, depths, samples, seed, batch = check_eval(
        task, policies, capacities, depths, samples, seed, prefill, chunk, batch, sinks, positions, state_dtype)
    lengths = list(dict.fromkeys(check_int("lengths", n) for n in _values(lengths, "lengths")))
    max_new = ANSWER_TOKENS[task] + (CHAT_EXTRA_TOKENS if chat else 0)
    limit = model.cfg.max_position_embeddings
    if any(not s.policy.bounded for s in specs):
        for n in lengths:
            if n + max_new > limit:
                raise InvalidArgument(f"length {n} (+ {max_new} answer tokens) is beyond the model's "
                                      f"trained context of {limit} tokens, which full cannot go past",
                                      "lengths")
    hay = Haystack.from_file(model, haystack) if haystack is not None else Haystack(model)
    # every prompt is built (and every length checked against the task) before any run
    grid_of_prompts = {n: [make_prompt(model, task, n, d, s, seed, hay, chat) for d in depths for s in range(samples)]
            for n in lengths}

    def run(spec, prompts, per=1):
        """Greedy answers of `prompts` under `spec`, each prompt in `per` consecutive rows
        (one per member policy of a side-by-side run), in runs of `batch` prompts."""
        import time

        step = batch or len(prompts)
        texts, t0 = [], time.perf_counter()
        for i in range(0, len(prompts), step):
            rows = [list(p.ids) for p in prompts[i:i + step] for _ in range(per)]
            with model.scope():
                res = generate_tokens(model.params, model.cfg, spec, rows, max_new, eos_ids=model.eos_ids,
                                      steps_per_call=max_new, mesh=model.mesh)
            texts.extend(model.decode(t) for t in res.tokens)
            if progress is not None:
                progress(sum(len(r) for r in rows))
        return texts, time.perf_counter() - t0

    def records(spec, name, cap, prompts, answers, shared, seconds):
        for d in depths:
            mine = [(p, a) for p, a in zip(prompts, answers) if p.depth == d]
            acc = float(np.mean([score_answer(a, p.expected) for p, a in mine]))
            yield EvalRecord(task, name, cap, prompts[0].length, d, len(mine), acc, [a for _, a in mine],
                             [p.expected for p, _ in mine], spec.prefill, spec.positions, shared, seconds)

    for n, prompts in grid_of_prompts.items():
        for spec, members in fused_runs(specs, fuse):
            answers, sec = run(spec, prompts, len(members))
            cap = spec.capacity if spec.policy.bounded else n
            for i, member in enumerate(members):
                mine = [answers[r] for r in spec.policy.rows_of(i, len(answers))]
                yield from records(spec, policy_name(member), cap, prompts, mine, len(members), sec)
