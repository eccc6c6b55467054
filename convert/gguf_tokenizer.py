"""The tokenizer a GGUF file describes, built with the `tokenizers` library (no PyTorch).

A GGUF file has no `tokenizer.json`: llama.cpp stores the vocabulary, the merges, the
token types, the special token ids, the pre-tokenizer's name and the chat template as
metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`). Two vocabulary kinds cover the
families this project loads:

- `gpt2`: byte-level BPE (SmolLM2, Llama-3, Qwen2). Text is split by the pre-tokenizer
  that `tokenizer.ggml.pre` names (llama.cpp's list), then every piece is spelled in
  GPT-2's byte alphabet and merged.
- `llama`: SentencePiece BPE with byte fallback (LLaMA-2, TinyLlama, Mistral). Spaces
  become "▁", a "▁" is prepended to the text, unknown characters fall back to `<0xNN>`
  byte tokens; merges come from the file or, when it has none, from the pieces' scores.

Tokens the file marks as control (type 3) are added as special tokens, user-defined ones
(type 4) as plain added tokens, so both stay whole. The result is a transformers
`PreTrainedTokenizerFast`, so chat templates, `decode` and `eos_token_id` work as they do
for a Hugging Face folder. The ids equal transformers' own GGUF tokenizer
(`tests/test_gguf_tokenizer.py`), which needs PyTorch to read the file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MsrnnError, UnsupportedConfigError
from ._common import one_line

CONTROL, USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names -> how the text is split before BPE (`llama-vocab.cpp`).
# None = GPT-2's own split (ByteLevel's regex).
_GPT2 = None
_DIGITS = "digits"  # each digit alone, then GPT-2's split (StarCoder, SmolLM)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2, "olmo": _GPT2, "jais": _GPT2,
    "smollm": _DIGITS, "starcoder": _DIGITS, "refact": _DIGITS, "command-r": _DIGITS,
    "codeshell": _DIGITS, "exaone": _DIGITS, "minerva-7b": _DIGITS,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3,
    "dbrx": _LLAMA3, "falcon3": _LLAMA3, "pixtral": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2,
}


def tokenizer_metadata(reader, path: Path) -> dict:
    """The `tokenizer.*` metadata of a parsed GGUF file (a `gguf.GGUFReader`) as plain
    Python values; empty when the file carries no tokenizer."""
    try:
        return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    except Exception as e:
        raise MsrnnError(f"cannot read the tokenizer of {path}: {one_line(e)}") from e


def _byte_level(meta: dict, path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    # A token outside GPT-2's byte alphabet (a special token like "<|im_start|>" is inside
    # it) is spelled byte by byte, as transformers and llama.cpp read it.
    vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedConfigError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported (supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))})")
    split = PRE_TOKENIZERS[pre]
    if split is _GPT2:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif split is _DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, spelled


def _sentencepiece(meta: dict, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, vocab, meta.get("tokenizer.ggml.scores"), path)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok, None


def _merges_from_scores(tokens, vocab, scores, path: Path) -> list[tuple[str, str]]:
    """SentencePiece merges implied by the vocabulary ({piece: id}): every split of a piece
    into two pieces of the vocabulary, best-scored piece first (sentencepiece's own BPE)."""
    if scores is None:
        raise MsrnnError(f"{path}: a sentencepiece GGUF vocabulary needs merges or scores")
    merges = []
    for piece, score in zip(tokens, scores):
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(l, r, score) for l, r in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(l, r) for l, r, _ in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: every byte as a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


_BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def build_tokenizer(meta: dict, path: Path):
    """A transformers fast tokenizer from a GGUF file's `tokenizer.*` metadata (errors:
    one `MsrnnError` line naming the file)."""
    try:
        return _build(meta, path)
    except MsrnnError:
        raise
    except Exception as e:
        raise MsrnnError(f"cannot build a tokenizer from {path}: {one_line(e)}") from e


def _build(meta: dict, path: Path):
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind not in _BUILDERS:
        raise UnsupportedConfigError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    tok, spelled = _BUILDERS[kind](meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # A control token outside a byte-level alphabet is a mislabelled byte sequence: skip it.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types)
                            if ty == CONTROL and (spelled is None or set(t) <= spelled)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        one = " ".join([*([bos] if add_bos else []), "$A", *([eos] if add_eos else [])])
        two = " ".join([*([bos] if add_bos else []), "$B:1", *([eos] if add_eos else [])])
        ids = {bos: meta["tokenizer.ggml.bos_token_id"]} if add_bos else {}
        ids.update({eos: meta["tokenizer.ggml.eos_token_id"]} if add_eos else {})
        tok.post_processor = processors.TemplateProcessing(
            single=one, pair=f"{one} {two}", special_tokens=list(ids.items()))
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False)


def load_gguf_tokenizer(path) -> object:
    """The tokenizer of a GGUF file (a transformers fast tokenizer), without PyTorch."""
    from .gguf_loader import _reader

    path = Path(path)
    return build_tokenizer(tokenizer_metadata(_reader(path), path), path)
