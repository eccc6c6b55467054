"""RULER's tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"), generated here, offline and deterministically from a seed.

Each sample is split the way kvpress splits RULER's prompts: `context` (the instruction and
the haystack: what a press compresses), `question`, `answer_prefix` (the start of the
answer, given to the model) and the expected `answers`. The templates, answer prefixes,
generation lengths, task settings and metrics are RULER's (`scripts/synthetic.yaml`,
`scripts/data/synthetic/constants.py`, `scripts/eval/synthetic/constants.py`); the code is
ours. What differs from RULER:

* the essay haystack (Paul Graham's essays, which RULER downloads) is the public-domain
  books of `data/` (or the .txt files of any folder): the run's config.yaml says which;
* RULER draws needle keys and cwe's words from the `wonderwords` lists; ours come from
  `ruler_words` (a smaller list of common English words), and its random draws are
  numpy's, so a seed does not give RULER's own samples;
* the fit to the length is a bisection over the haystack's size (RULER grows it in steps),
  counted with the caller's `count` (the model's tokenizer, as the run builds the prompt);
* `qa_1` / `qa_2` read SQuAD / HotpotQA files the caller names; RULER downloads them.

Every generator takes `count(sample) -> tokens` and a `budget` (the most prompt tokens:
RULER's `max_seq_length` less the task's generation length) and returns the largest sample
that fits, so a tiny tokenizer in the tests exercises the same fitting as the model's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import InvalidArgument, MsrnnError
from .ruler_words import ADJECTIVES, NOUNS, WORDS

# (task, its RULER family, its settings), in RULER's order (scripts/synthetic.yaml)
NIAH = {  # haystack, key kind, value kind, keys, values per key, keys asked
    "niah_single_1": ("repeat", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
TASKS = tuple(NIAH) + ("vt", "cwe", "fwe", "qa_1", "qa_2")
QA_TASKS = {"qa_1": "squad", "qa_2": "hotpotqa"}
ESSAY_TASKS = tuple(t for t, spec in NIAH.items() if spec[0] == "essay")

# generation length per family (RULER's tokens_to_generate)
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))  # RULER's essay depths
QA_INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and do not "
                  "output any other words.")


def family(task: str) -> str:
    """RULER's task family: niah, vt, cwe, fwe or qa."""
    return "niah" if task.startswith("niah") else task.split("_")[0]


def metric_name(task: str) -> str:
    """RULER's metric of a task: string_match_part for QA, string_match_all otherwise."""
    return "string_match_part" if family(task) == "qa" else "string_match_all"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One RULER sample, split as kvpress splits it (the prompt is context + question +
    answer_prefix). `depths`: where each needle sits, as a fraction of the haystack's units
    (niah); `units`: the haystack's size after fitting (words, lines, list entries or
    documents)."""

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    answers: tuple
    max_new_tokens: int
    needles: tuple = ()
    depths: tuple = ()
    units: int = 0


# -- metrics (RULER's, in percent) ------------------------------------------------------
def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """The mean over samples of the fraction of a sample's references found in its
    prediction (case-insensitive), in percent, rounded to 2 decimals."""
    if not preds:
        return float("nan")
    per = [sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs)]
    return round(100 * sum(per) / len(preds), 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """The fraction of samples whose prediction contains any of its references
    (case-insensitive), in percent, rounded to 2 decimals."""
    if not preds:
        return float("nan")
    hits = [max(r.lower() in p.lower() for r in ref) for p, ref in zip(preds, refs)]
    return round(100 * sum(hits) / len(preds), 2)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def clean_answer(text: str) -> str:
    """A prediction as kvpress scores it: control characters removed, ends stripped."""
    return re.sub(r"[\x00-\x1f]", "", text.strip()).strip()


def score(task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return METRICS[metric_name(task)]([clean_answer(p) for p in preds], refs)


# -- random draws ------------------------------------------------------------------------
def _rng(seed: int, task: str, index: int, *extra: int) -> np.random.Generator:
    """The generator of one sample: a function of (seed, task, index) only, so a sample is
    the same whatever else is generated, and every size tried while fitting draws the same
    keys and values."""
    return np.random.default_rng([seed, TASKS.index(task), index, *extra])


def _draw(rng: np.random.Generator, kind: str) -> str:
    if kind == "numbers":
        return str(int(rng.integers(10**6, 10**7)))  # 7 digits, as RULER's
    if kind == "words":
        return f"{ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]}-{NOUNS[int(rng.integers(len(NOUNS)))]}"
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _insert(units: list[str], items: Sequence[str], at: Sequence[int]) -> list[str]:
    """`units` with items[i] placed before units[at[i]] (at sorted ascending)."""
    out, prev = [], 0
    for item, a in zip(items, at):
        out += units[prev:a] + [item]
        prev = a
    return out + units[prev:]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# -- the families ------------------------------------------------------------------------
def _niah(task: str, index: int, seed: int, n: int, hay_words: Sequence[str] | None) -> Sample:
    hay, key_kind, value_kind, n_keys, n_values, n_queries = NIAH[task]
    rng = _rng(seed, task, index)
    keys, values, needles = [], [], []
    for _ in range(n_keys):
        keys.append(_draw(rng, key_kind))
        values.append([_draw(rng, value_kind) for _ in range(n_values)])
        needles += [NEEDLE.format(kind=value_kind, key=keys[-1], value=v) for v in values[-1]]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    asked = sorted(int(i) for i in rng.choice(n_keys, n_queries, replace=False))
    start = int(rng.integers(len(hay_words))) if hay == "essay" else 0
    essay_depths = sorted(int(d) for d in rng.choice(DEPTHS, len(needles), replace=False))
    # what depends on the haystack's size n is drawn last
    if hay == "essay":
        words = [hay_words[(start + i) % len(hay_words)] for i in range(n)]
        units = _sentences(" ".join(words))
        at = [int(len(units) * d / 100) for d in essay_depths]
        sep = " "
    else:
        if hay == "repeat":
            units = [NOISE] * n
        else:  # distractor needles, none with a key asked for
            units = []
            while len(units) < n:
                k = _draw(rng, key_kind)
                if k not in keys:
                    units.append(NEEDLE.format(kind=value_kind, key=k, value=_draw(rng, value_kind)))
        at = sorted(int(i) for i in rng.choice(n + 1, len(needles), replace=False)) if n >= len(needles) \
            else [0] * len(needles)
        sep = "\n"
    haystack = sep.join(_insert(units, needles, at))
    query = keys[asked[0]] if n_queries == 1 else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]]
    one = n_queries * n_values == 1  # RULER's singular wording
    kind = value_kind[:-1] if one else value_kind
    some, are, what = ("A", "is", "What is the") if one else ("Some", "are", "What are all the")
    context = (f"{some} special magic {kind} {are} hidden within the following text. Make sure to memorize it. "
               f"I will quiz you about the {kind} afterwards.\n{haystack}\n")
    question = f"{what} special magic {kind} for {query} mentioned in the provided text?"
    prefix = f" The special magic {kind} for {query} mentioned in the provided text {are}"
    answers = tuple(v for i in asked for v in values[i])
    depths = tuple(a / max(len(units), 1) for a in at)
    return Sample(task, index, context, question, prefix, answers, MAX_NEW_TOKENS["niah"], tuple(needles),
                  depths, n)


def _vt_parts(rng: np.random.Generator, n: int, letters: int) -> tuple[str, str, list[str]]:
    """RULER's variable tracking: one chain of 4 hops (5 variables) in n noise lines.
    Returns (the text, the value, the variables assigned it)."""
    names: list[str] = []
    while len(names) < 5:
        v = "".join(chr(65 + int(c)) for c in rng.integers(26, size=letters))
        if v not in names:
            names.append(v)
    value = str(int(rng.integers(10000, 99999)))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
    at = sorted(int(i) for i in rng.choice(n + 1, len(chain), replace=True))
    lines = _insert([NOISE + "\n"] * n, chain, at)
    return " ".join(lines).replace(". \n", ".\n"), value, names


VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
# "assgined" is RULER's spelling, kept: the prompt is the benchmark's
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
             "assgined the value {value}, they are: ")


def _vt(task: str, index: int, seed: int, n: int) -> Sample:
    # one worked example first (RULER's few-shot: 3-letter names, a short text), then the task
    ex_text, ex_value, ex_names = _vt_parts(_rng(seed, task, 0, 1), 8, 3)
    example = (VT_INSTRUCTION + ex_text + "\n" + VT_QUESTION.format(value=ex_value)
               + VT_PREFIX.format(value=ex_value) + " ".join(ex_names) + "\n\n")
    text, value, names = _vt_parts(_rng(seed, task, index), n, 5)
    return Sample(task, index, example + VT_INSTRUCTION + text + "\n", VT_QUESTION.format(value=value),
                  VT_PREFIX.format(value=value), tuple(names), MAX_NEW_TOKENS["vt"], units=n)


CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.\n")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


def _cwe_list(rng: np.random.Generator, vocab: Sequence[str], n: int, common: int, uncommon: int):
    picked = [vocab[int(i)] for i in rng.choice(len(vocab), n, replace=False)]
    top, rest = picked[:10], picked[10:]
    words = top * common + rest * uncommon
    words = [words[int(i)] for i in rng.permutation(len(words))]
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), top


def _cwe(task: str, index: int, seed: int, n: int, length: int) -> Sample:
    # RULER: below 4096 tokens the common words repeat 6 times (the example's 3), else 30 (10)
    (ex_n, ex_c, ex_u), (c, u) = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (30, 3))
    ex_text, ex_top = _cwe_list(_rng(seed, task, 0, 1), WORDS, ex_n, ex_c, ex_u)
    example = (CWE_INSTRUCTION + ex_text + "\n" + CWE_QUESTION + CWE_PREFIX + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top)) + "\n")
    text, top = _cwe_list(_rng(seed, task, index), WORDS, n, c, u)
    return Sample(task, index, example + CWE_INSTRUCTION + text + "\n", CWE_QUESTION, CWE_PREFIX, tuple(top),
                  MAX_NEW_TOKENS["cwe"], units=n)


FWE_INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. Find the three "
                   "most frequently appeared coded words. ")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
ZETA_2 = math.pi ** 2 / 6  # RULER's alpha is 2


def _fwe(task: str, index: int, seed: int, n: int, length: int) -> Sample:
    rng = _rng(seed, task, index)
    size = max(length // 50, 4)  # RULER's vocabulary: max_seq_length // 50 coded words of 6 letters
    vocab: list[str] = []
    while len(vocab) < size:
        w = "".join(chr(97 + int(c)) for c in rng.integers(26, size=6))
        if w not in vocab:
            vocab.append(w)
    vocab[0] = "..."  # the most frequent "word" is noise
    counts = (n * np.arange(1, size + 1, dtype=float) ** -2.0 / ZETA_2).astype(int)
    words = [w for w, k in zip(vocab, counts) for _ in range(k)]
    words = [words[int(i)] for i in rng.permutation(len(words))]
    return Sample(task, index, FWE_INSTRUCTION + " ".join(words) + "\n", FWE_QUESTION, FWE_PREFIX,
                  tuple(vocab[1:4]), MAX_NEW_TOKENS["fwe"], units=n)


# -- QA (local SQuAD / HotpotQA files) ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QAData:
    """Questions with their gold documents (indices into `docs`) and, for SQuAD, the other
    paragraphs of the same article (`more`), as RULER reads them."""

    questions: tuple  # (question, answers, gold doc indices, more doc indices)
    docs: tuple
    source: str


def read_qa(path: str | Path, kind: str) -> QAData:
    """A SQuAD (v1.1 or v2.0, `{"data": [...]}`) or HotpotQA (a list of
    `{"question", "answer", "context": [[title, [sentences]]]}`) JSON file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MsrnnError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MsrnnError(f"{path} is not a {kind} JSON file ({e})") from None
    try:
        if kind == "squad":
            docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
            at = {c: i for i, c in enumerate(docs)}
            qs = []
            for d in data["data"]:
                article = [at[p["context"]] for p in d["paragraphs"]]
                for p in d["paragraphs"]:
                    gold = at[p["context"]]
                    qs += [(q["question"], tuple(a["text"] for a in q["answers"]), (gold,),
                            tuple(i for i in article if i != gold))
                           for q in p["qas"] if not q.get("is_impossible", False) and q["answers"]]
        else:
            doc = lambda t, p: f"{t}\n{''.join(p)}"
            docs = sorted({doc(t, p) for d in data for t, p in d["context"]})
            at = {c: i for i, c in enumerate(docs)}
            qs = [(d["question"], (d["answer"],), tuple(at[doc(t, p)] for t, p in d["context"]), ())
                  for d in data]
    except (KeyError, TypeError, ValueError) as e:
        raise MsrnnError(f"{path} is not a {kind} JSON file (no {e})") from None
    if not qs:
        raise MsrnnError(f"{path} has no answerable questions")
    return QAData(tuple(qs), tuple(docs), str(path))


def _qa(task: str, index: int, seed: int, n: int, qa: QAData) -> Sample:
    order = _rng(seed, task, 0, 2).permutation(len(qa.questions))  # the questions in a seeded order
    question, answers, gold, more = qa.questions[int(order[index % len(qa.questions)])]
    rng = _rng(seed, task, index)
    others = [i for i in rng.permutation(len(qa.docs)) if i not in gold and i not in more]
    docs = (list(gold) + list(more) + [int(i) for i in others])[:max(n, len(gold))]
    docs = [qa.docs[docs[int(i)]] for i in rng.permutation(len(docs))]
    text = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    context = f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n{text}\n\n"
    return Sample(task, index, context, f"{QA_INSTRUCTION}\n\nQuestion: {question}", " Answer:", tuple(answers),
                  MAX_NEW_TOKENS["qa"], units=len(docs))


# -- fitting -----------------------------------------------------------------------------
def largest_fit(build: Callable[[int], Sample], count: Callable[[Sample], int], budget: int,
                lo: int = 1, hi: int = 1 << 20) -> Sample:
    """The sample of the largest size n in [lo, hi] whose prompt has at most `budget`
    tokens (doubling, then bisection: the token count grows with n)."""
    first = build(lo)
    if count(first) > budget:
        raise InvalidArgument(f"{first.task} needs more than {budget} prompt tokens even with the smallest "
                              f"haystack ({count(first)}); ask for a longer length", "lengths")
    good, bad = lo, None
    n = lo
    while bad is None and n < hi:
        n = min(hi, 2 * n)
        if count(build(n)) <= budget:
            good = n
        else:
            bad = n
    bad = bad if bad is not None else hi + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if count(build(mid)) <= budget:
            good = mid
        else:
            bad = mid
    return build(good)


def make_sample(task: str, index: int, seed: int, length: int, count: Callable[[Sample], int],
                hay_words: Sequence[str] | None = None, qa: QAData | None = None) -> Sample:
    """Sample `index` of `task` fitted to `length` tokens as RULER fits it: prompt tokens
    (by `count`) + the task's generation length <= length."""
    fam = family(task)
    budget = length - MAX_NEW_TOKENS[fam]
    if budget < 1:
        raise InvalidArgument(f"length {length} leaves no room for a prompt after {task}'s "
                              f"{MAX_NEW_TOKENS[fam]} answer tokens", "lengths")
    if fam == "niah":
        if NIAH[task][0] == "essay" and not hay_words:
            raise InvalidArgument(f"{task} needs an essay haystack (a folder of .txt files)", "haystack")
        hi = 1 << 20 if NIAH[task][0] == "essay" else 1 << 16
        return largest_fit(lambda n: _niah(task, index, seed, n, hay_words), count, budget, 1, hi)
    if fam == "vt":
        return largest_fit(lambda n: _vt(task, index, seed, n), count, budget, 1, 1 << 16)
    if fam == "cwe":
        return largest_fit(lambda n: _cwe(task, index, seed, n, length), count, budget, 11, len(WORDS))
    if fam == "fwe":
        return largest_fit(lambda n: _fwe(task, index, seed, n, length), count, budget, 1, 1 << 20)
    if qa is None:
        raise InvalidArgument(f"{task} needs a local {QA_TASKS[task]} file", task)
    return largest_fit(lambda n: _qa(task, index, seed, n, qa), count, budget, 1, len(qa.docs))


def read_haystack(folder: str | Path) -> tuple[list[str], list[str]]:
    """The words of every .txt file in `folder` (sorted by name, joined), and the file
    names: the essay haystack."""
    root = Path(folder)
    if not root.is_dir():
        raise MsrnnError(f"the haystack must be a folder of .txt files: {folder}")
    files = sorted(root.glob("*.txt"))
    words: list[str] = []
    for f in files:
        try:
            words += f.read_text(encoding="utf-8").split()
        except UnicodeDecodeError as e:
            raise MsrnnError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not words:
        raise MsrnnError(f"no text in the .txt files of {folder}")
    return words, [f.name for f in files]
