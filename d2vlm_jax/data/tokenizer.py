"""Tokenizers of the data layer: the LLM's text tokenizer and the Q-Former's WordPiece.

Both wrap HF ``tokenizers`` (Rust, no ``transformers`` at run time) loaded from local files:

* :class:`TextTokenizer` — the LLM tokenizer from a ``tokenizer.json`` (Phi-3's works as is:
  SentencePiece-style BPE with byte fallback and the chat specials ``<|system|>``,
  ``<|user|>``, ``<|assistant|>``, ``<|end|>``). ``<evi>`` and ``</evi>`` are added as special
  tokens when missing; :attr:`TextTokenizer.num_added_tokens` tells the model how far to grow
  its vocabulary. ``encode`` never adds BOS/EOS: the chat template (``template.py``) places
  them explicitly.
* :class:`QFormerTokenizer` — BERT uncased WordPiece from a ``vocab.txt`` as InstructBLIP /
  E.T. Chat use it: ``[CLS] question [SEP]``, truncated on the **left** to ``max_length``
  (default 256, special tokens included), with a ``[DEC]`` token appended to the vocabulary
  (E.T. Chat registers it as the BERT tokenizer's ``bos_token``; it is never inserted into the
  instruction text, but the Q-Former's word embedding has ``len(vocab) + 1`` rows because of it).
* :func:`train_tiny_tokenizers` — trains both offline on a small corpus (synthetic data, tests).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
EVIDENCE_TOKEN = "<evi>"
EVIDENCE_END_TOKEN = "</evi>"
IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant."  # Phi-3 system turn of E.T. Chat / D²VLM
CHAT_SPECIAL_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
EVIDENCE_SPECIAL_TOKENS = (EVIDENCE_TOKEN, EVIDENCE_END_TOKEN)

QFORMER_DEC_TOKEN = "[DEC]"
QFORMER_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Candidates for the padding id, in order of preference (Phi-3 pads with <|endoftext|>).
_PAD_CANDIDATES = ("<pad>", "<|endoftext|>", "</s>", "<unk>")
_PREFIX_SPACE_SCHEMES = ("always", "first", "never")


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed or lacks a required token."""


class TextTokenizer:
    """The LLM tokenizer (HF ``tokenizers.Tokenizer`` from a local ``tokenizer.json``).

    Args:
      path: the ``tokenizer.json`` file (or a folder holding one).
      prefix_space: ``None`` keeps the file's SentencePiece prefix-space behaviour. For a
        Metaspace/SentencePiece tokenizer (Phi-3, Llama) ``"always" | "first" | "never"``
        rewrites it the way ``transformers`` converts a slow Llama tokenizer with
        ``legacy=False``: no normalizer, a ``Metaspace`` pre-tokenizer with that prepend
        scheme. The authors' D²VLM runs (fast tokenizer, ``legacy=False``,
        ``add_prefix_space=False``) correspond to ``"never"``.

    Special tokens (the file's added tokens, plus ``<evi>`` and ``</evi>``) are matched before
    any normalization and are never split.
    """

    def __init__(self, path: str | os.PathLike, *, prefix_space: str | None = None):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"LLM tokenizer file not found: {path}")
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the Rust error says what is wrong inside the JSON
            raise TokenizerError(f"cannot load LLM tokenizer {path}: {e}") from e
        self.path = path
        # Template padding/truncation would silently change ids: the collate step pads.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        if prefix_space is not None:
            self._set_prefix_space(prefix_space)
        missing = [t for t in CHAT_SPECIAL_TOKENS if self._tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"LLM tokenizer {path} lacks the chat token(s) {missing} (Phi-3 template)")
        size_before = self._tokenizer.get_vocab_size(with_added_tokens=True)
        to_add = [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
                  for t in EVIDENCE_SPECIAL_TOKENS if self._tokenizer.token_to_id(t) is None]
        self._tokenizer.add_special_tokens(to_add)
        self.num_added_tokens: int = self._tokenizer.get_vocab_size(with_added_tokens=True) - size_before
        for t in EVIDENCE_SPECIAL_TOKENS:
            if self._tokenizer.token_to_id(t) is None:
                raise TokenizerError(f"could not add {t!r} to LLM tokenizer {path}")
            # A token present in the model vocabulary but not registered as added/special would
            # be split by normalization ("<evi>" -> "<", "evi", ">"): check it encodes as one id.
            if self._tokenizer.encode(t, add_special_tokens=False).ids != [self._tokenizer.token_to_id(t)]:
                raise TokenizerError(f"{t!r} is in {path} but is not a special (added) token: it would be split")

    def _set_prefix_space(self, scheme: str) -> None:
        if scheme not in _PREFIX_SPACE_SCHEMES:
            raise TokenizerError(f"prefix_space must be one of {_PREFIX_SPACE_SCHEMES} or None, got {scheme!r}")
        spec = json.loads(self._tokenizer.to_str())
        norm = json.dumps(spec.get("normalizer"), ensure_ascii=False)
        pre = json.dumps(spec.get("pre_tokenizer"))
        if "\u2581" not in norm and "Metaspace" not in pre:
            raise TokenizerError(f"prefix_space={scheme!r} applies to SentencePiece-style (▁) tokenizers only; "
                                 f"{self.path} is not one")
        self._tokenizer.normalizer = None
        self._tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme,
                                                                 split=False)

    # ------------------------------------------------------------------ ids

    def token_id(self, token: str) -> int:
        """Id of a single token; raises :class:`TokenizerError` naming it when absent."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the LLM tokenizer {self.path}")
        return token_id

    @property
    def end_id(self) -> int:
        return self.token_id(END_TOKEN)

    @property
    def evi_id(self) -> int:
        return self.token_id(EVIDENCE_TOKEN)

    @property
    def evi_end_id(self) -> int:
        return self.token_id(EVIDENCE_END_TOKEN)

    @property
    def bos_id(self) -> int | None:
        """``<s>`` when the vocabulary has one (Phi-3: 1), else ``None``."""
        return self._tokenizer.token_to_id("<s>")

    @property
    def pad_id(self) -> int:
        for t in _PAD_CANDIDATES:
            token_id = self._tokenizer.token_to_id(t)
            if token_id is not None:
                return token_id
        return self.end_id

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (``max id + 1`` for HF files)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._tokenizer.token_to_id(t.content)
                         for t in self._tokenizer.get_added_tokens_decoder().values() if t.special)

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS/EOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer (with ``<evi>``/``</evi>``) as a ``tokenizer.json``."""
        self._tokenizer.save(os.fspath(path))


class QFormerTokenizer:
    """BERT uncased WordPiece for the Q-Former's instruction text.

    ``encode(question)`` -> ``[CLS] wordpieces [SEP]``; when longer than ``max_length`` the
    **oldest** (leftmost) wordpieces are dropped (``truncation_side='left'`` in E.T. Chat).
    ``[DEC]`` is appended to the vocabulary (id ``len(vocab.txt)``) and never emitted.
    """

    def __init__(self, vocab_path: str | os.PathLike, *, max_length: int = 256):
        vocab_path = os.fspath(vocab_path)
        if os.path.isdir(vocab_path):
            vocab_path = os.path.join(vocab_path, "vocab.txt")
        if not os.path.isfile(vocab_path):
            raise TokenizerError(f"Q-Former vocab file not found: {vocab_path}")
        if max_length < 3:
            raise TokenizerError(f"Q-Former max_length must be >= 3 ([CLS] x [SEP]), got {max_length}")
        with open(vocab_path, encoding="utf-8") as f:
            vocab = {}
            for line in f:
                token = line.rstrip("\n")
                if token in vocab:
                    raise TokenizerError(f"Q-Former vocab {vocab_path}: duplicate token {token!r}")
                vocab[token] = len(vocab)
        missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in vocab]
        if missing:
            raise TokenizerError(f"Q-Former vocab {vocab_path} lacks {missing}")
        if QFORMER_DEC_TOKEN in vocab:
            raise TokenizerError(f"Q-Former vocab {vocab_path} already holds {QFORMER_DEC_TOKEN}; expected it to "
                                 "be appended (E.T. Chat adds it to bert-base-uncased)")
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.add_special_tokens([t for t in QFORMER_SPECIAL_TOKENS if t in vocab])
        tok.add_special_tokens([QFORMER_DEC_TOKEN])
        tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
        tok.enable_truncation(max_length, direction="left")
        tok.no_padding()
        self._tokenizer = tok
        self.path = vocab_path
        self.max_length = max_length
        self.dec_id: int = tok.token_to_id(QFORMER_DEC_TOKEN)
        self.cls_id: int = vocab["[CLS]"]
        self.sep_id: int = vocab["[SEP]"]
        self.pad_id: int = vocab.get("[PAD]", 0)

    @property
    def vocab_size(self) -> int:
        """WordPiece vocabulary + ``[DEC]`` (bert-base-uncased: 30523)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """``[CLS] ... [SEP]`` ids, at most ``max_length`` of them (left-truncated)."""
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


# ---------------------------------------------------------------------------- tiny training


def train_tiny_tokenizers(texts: Iterable[str], out_dir: str | os.PathLike, *, llm_vocab_size: int = 1000,
                          qformer_vocab_size: int = 600) -> tuple[str, str]:
    """Trains a tiny LLM tokenizer and a tiny Q-Former WordPiece vocabulary on ``texts``.

    The LLM tokenizer mimics Phi-3's structure (SentencePiece-style ``▁`` BPE with byte
    fallback, ``Metaspace`` prefix scheme ``never``) and holds, before any learned piece,
    ``<unk> <s> </s> <pad> <|endoftext|> <|system|> <|user|> <|assistant|> <|end|> <image>
    <evi> </evi>`` (ids 0..11) plus the 256 byte tokens, so any text encodes. The Q-Former
    vocabulary is a BERT-style ``vocab.txt`` (``[PAD] [UNK] [CLS] [SEP] [MASK]`` first).
    Deterministic: the same corpus gives byte-identical files.

    Returns ``(llm_tokenizer_json_path, qformer_vocab_txt_path)``.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # Order-independent and deterministic; the template's fixed system prompt is always included.
    corpus = sorted(set(texts) | {DEFAULT_SYSTEM_PROMPT})
    if not corpus:
        raise TokenizerError("train_tiny_tokenizers: empty corpus")
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|endoftext|>", SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN,
                END_TOKEN, IMAGE_TOKEN, EVIDENCE_TOKEN, EVIDENCE_END_TOKEN]
    # Strip the specials from the corpus so the trainer does not learn pieces of them.
    clean = []
    for text in corpus:
        for s in specials:
            text = text.replace(s, " ")
        clean.append(text)

    llm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    llm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    llm.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=llm_vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=specials + byte_tokens, initial_alphabet=["\u2581"])
    llm.train_from_iterator(clean, trainer=trainer)
    llm = _bytes_as_plain_vocabulary(llm)
    llm.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    llm_path = os.path.join(out_dir, "tokenizer.json")
    llm.save(llm_path)

    qformer_path = os.path.join(out_dir, "vocab.txt")
    with open(qformer_path, "w", encoding="utf-8") as f:
        for token in _tiny_wordpiece_vocab(corpus, qformer_vocab_size):
            f.write(token + "\n")
    return llm_path, qformer_path


def _tiny_wordpiece_vocab(corpus: Sequence[str], vocab_size: int) -> list[str]:
    """BERT-style vocabulary built by counting (deterministic, unlike the WordPiece trainer).

    ``[PAD] [UNK] [CLS] [SEP] [MASK]``, then every character both as a word start and as a
    ``##`` continuation (so every word of the corpus decomposes without ``[UNK]``), then the
    most frequent whole words (ties broken alphabetically) up to ``vocab_size``.
    """
    norm = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for text in corpus:
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for word in counts for c in word})
    vocab = list(QFORMER_SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    seen = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def _bytes_as_plain_vocabulary(tokenizer: Tokenizer) -> Tokenizer:
    """The BPE trainer registers its ``special_tokens`` (here also the 256 ``<0xXX>`` byte
    pieces) as added special tokens. As in Phi-3/Llama files, byte pieces must live in the model
    vocabulary only (byte fallback reads them there): otherwise a literal ``<0x41>`` in a text
    would match, and ``decode(skip_special_tokens=True)`` would drop every byte-coded char."""
    spec = json.loads(tokenizer.to_str())
    byte_pieces = {f"<0x{i:02X}>" for i in range(256)}
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_pieces]
    return Tokenizer.from_str(json.dumps(spec))
