"""LLM and Q-Former tokenizers: special tokens, Phi-3 file structure, parity with transformers."""

from __future__ import annotations

import filecmp
import json

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from d2vlm_jax.data.tokenizer import QFormerTokenizer, TextTokenizer, TokenizerError, train_tiny_tokenizers

CORPUS = ["When does the person open the fridge?", "The person opens the fridge at <evi>.",
          "A man cuts onions <evi>, then fries them <evi> in a pan.", "What happens after <evi>?",
          "You are a helpful AI assistant."]
# Phi-3-mini's added tokens (ids 32000..32010 there) with their flags: the chat markers strip the
# whitespace on their right (rstrip), <|endoftext|> does not.
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]


def write_phi3_like(path) -> str:
    """A tokenizer.json built like Phi-3-mini's: SentencePiece BPE (byte fallback, ``▁``),
    normalizer Prepend("▁") + Replace(" ", "▁"), ``<s> $A`` post-processor, <unk>/<s>/</s> at
    0/1/2 and the chat specials appended after the vocabulary."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator([c.replace("<evi>", "") for c in CORPUS], trainer=trainer)
    spec = json.loads(tok.to_str())  # byte pieces belong to the model vocabulary only, as in Phi-3
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, rstrip=t != "<|endoftext|>", normalized=False, special=True)
                            for t in PHI3_ADDED])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = str(path / "tokenizer.json")
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def phi3_path(tmp_path_factory):
    return write_phi3_like(tmp_path_factory.mktemp("phi3"))


def test_evidence_tokens_are_added_and_reported(phi3_path):
    raw = Tokenizer.from_file(phi3_path)
    before = raw.get_vocab_size(with_added_tokens=True)
    tok = TextTokenizer(phi3_path)
    assert tok.num_added_tokens == 2
    assert (tok.evi_id, tok.evi_end_id) == (before, before + 1)
    assert tok.vocab_size == before + 2
    assert tok.end_id == raw.token_to_id("<|end|>") and tok.bos_id == 1
    assert tok.pad_id == raw.token_to_id("<|endoftext|>")
    # Saved with <evi>/</evi> inside, the file loads without adding anything and encodes alike.
    saved = phi3_path.replace("tokenizer.json", "with_evi.json")
    tok.save(saved)
    again = TextTokenizer(saved)
    assert again.num_added_tokens == 0 and again.evi_id == tok.evi_id
    assert again.encode("at <evi>.</evi>") == tok.encode("at <evi>.</evi>")


def test_encode_adds_no_bos_and_never_splits_specials(phi3_path):
    tok = TextTokenizer(phi3_path)
    assert Tokenizer.from_file(phi3_path).encode("the fridge").ids[0] == 1  # the file's post-processor adds <s>
    assert tok.encode("the fridge")[0] != 1
    assert tok.encode("<evi><evi></evi>") == [tok.evi_id, tok.evi_id, tok.evi_end_id]
    glued = tok.encode("fridge<evi>opens</evi><|end|>")
    assert glued.count(tok.evi_id) == 1 and glued.count(tok.evi_end_id) == 1 and glued[-1] == tok.end_id
    # As the file says, Prepend("▁") runs on every piece between special tokens (so "<evi>," holds "▁,"):
    assert tok.decode(tok.encode("at <evi>, <evi></evi> The")) == "at <evi> , <evi></evi>  The"
    # Phi-3's rstrip flags are honoured: the newline after a chat marker is absorbed by it.
    assert tok.encode("<|end|>\n<|user|>\n") == [tok.end_id, tok.token_id("<|user|>")]


def test_parity_with_transformers_fast_tokenizer(phi3_path):
    import transformers  # the test extra: never skip
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=phi3_path)
    ref.add_special_tokens({"additional_special_tokens": ["<evi>", "</evi>"]})
    tok = TextTokenizer(phi3_path)
    for text in ["<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n",
                 "\nWhen does the person open the fridge?<|end|>\n<|assistant|>\n",
                 "<evi>, <evi></evi> A man cuts onions <evi>, then fries them <evi>.<|end|>",
                 "Zebra ü 42 <evi>"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False))
    assert tok.vocab_size == len(ref)


def test_prefix_space_never_matches_authors_setting(phi3_path):
    keep, never = TextTokenizer(phi3_path), TextTokenizer(phi3_path, prefix_space="never")
    pieces = lambda t, ids: [t._tokenizer.id_to_token(i) for i in ids]  # noqa: E731
    assert pieces(keep, keep.encode("the fridge"))[0].startswith("\u2581")
    never_pieces = pieces(never, never.encode("the fridge"))
    assert not never_pieces[0].startswith("\u2581") and "\u2581" in "".join(never_pieces)
    assert never.encode("<evi> the") == [never.evi_id] + never.encode(" the")
    # ... and no space appears after special tokens: the text round-trips.
    assert never.decode(never.encode("at <evi>, <evi></evi> The")) == "at <evi>, <evi></evi> The"
    with pytest.raises(TokenizerError, match="prefix_space"):
        TextTokenizer(phi3_path, prefix_space="sometimes")


def test_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(TokenizerError, match="not found: .*missing.json"):
        TextTokenizer(tmp_path / "missing.json")
    no_chat = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    no_chat.save(str(tmp_path / "no_chat.json"))
    with pytest.raises(TokenizerError, match=r"lacks the chat token\(s\) \['<\|system\|>'"):
        TextTokenizer(tmp_path / "no_chat.json")
    # "<evi>" in the model vocabulary but not a special token: the pre-tokenizer would split it.
    vocab = {t: i for i, t in enumerate(["<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<evi>",
                                         "</evi>", "<", ">", "evi", "/"])}
    plain = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.add_special_tokens(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(TokenizerError, match="'<evi>' .* not a special .* split"):
        TextTokenizer(tmp_path / "plain.json")


# ---------------------------------------------------------------------------- Q-Former

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "when", "does", "the", "person", "open", "fridge", "?",
              "##s", "cut", "onion", ",", "a", "man", "caf", "##e", "<", ">", "ev", "##i"]


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(BERT_VOCAB) + "\n")
    return path


def test_qformer_layout_dec_token_and_left_truncation(bert_vocab):
    q = QFormerTokenizer(bert_vocab)
    v = {t: i for i, t in enumerate(BERT_VOCAB)}
    assert q.encode("When does the Person open the FRIDGE?") == [
        v["[CLS]"], v["when"], v["does"], v["the"], v["person"], v["open"], v["the"], v["fridge"], v["?"], v["[SEP]"]]
    assert q.encode("A man cuts onions, café") == [v["[CLS]"], v["a"], v["man"], v["cut"], v["##s"], v["onion"],
                                                   v["##s"], v[","], v["caf"], v["##e"], v["[SEP]"]]
    assert q.dec_id == len(BERT_VOCAB) and q.vocab_size == len(BERT_VOCAB) + 1
    assert q.dec_id not in q.encode("when does the person open the fridge?")
    short = QFormerTokenizer(bert_vocab, max_length=5)
    # [CLS] + the LAST three wordpieces + [SEP]
    assert short.encode("when does the person open the fridge?") == [v["[CLS]"], v["the"], v["fridge"], v["?"],
                                                                      v["[SEP]"]]


def test_qformer_parity_with_transformers_bert_tokenizer(bert_vocab):
    import transformers  # the test extra: never skip
    ref = transformers.BertTokenizer(str(bert_vocab), do_lower_case=True, truncation_side="left")
    ref.add_special_tokens(dict(bos_token="[DEC]"))  # as E.T. Chat / D2VLM build it
    for max_length in (256, 6):
        q = QFormerTokenizer(bert_vocab, max_length=max_length)
        for text in ["When does the person open the fridge?", "A man cuts onions, café <evi> xyz",
                     "What happens after <evi>?"]:
            want = ref(text, truncation=True, max_length=max_length).input_ids
            assert q.encode(text) == want, (text, max_length)
    assert q.vocab_size == len(ref) and q.dec_id == ref.convert_tokens_to_ids("[DEC]")


def test_qformer_vocab_errors(tmp_path):
    with pytest.raises(TokenizerError, match="vocab file not found"):
        QFormerTokenizer(tmp_path / "nope.txt")
    (tmp_path / "bad.txt").write_text("[PAD]\nhello\n")
    with pytest.raises(TokenizerError, match=r"lacks \['\[UNK\]', '\[CLS\]', '\[SEP\]'\]"):
        QFormerTokenizer(tmp_path / "bad.txt")


# ---------------------------------------------------------------------------- tiny training


def test_train_tiny_tokenizers_is_deterministic_and_complete(tmp_path):
    a = train_tiny_tokenizers(CORPUS, tmp_path / "a", llm_vocab_size=400, qformer_vocab_size=120)
    b = train_tiny_tokenizers(list(reversed(CORPUS)) + CORPUS[:2], tmp_path / "b", llm_vocab_size=400,
                              qformer_vocab_size=120)
    assert filecmp.cmp(a[0], b[0], shallow=False) and filecmp.cmp(a[1], b[1], shallow=False)
    tok = TextTokenizer(a[0])
    assert tok.num_added_tokens == 0
    added = {t["content"]: t["id"] for t in json.load(open(a[0]))["added_tokens"]}
    assert [added[t] for t in ["<unk>", "<s>", "</s>", "<pad>", "<|endoftext|>", "<|system|>", "<|user|>",
                               "<|assistant|>", "<|end|>", "<image>", "<evi>", "</evi>"]] == list(range(12))
    assert tok.pad_id == 3 and tok.evi_id == 10 and tok.end_id == 8
    for text in CORPUS + ["<|system|>\nYou are a helpful AI assistant.<|end|>\n", "Unseen wörds  and\ttabs"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.token_id("<unk>") not in tok.encode("Unseen wörds")  # byte fallback, never <unk>
    assert sorted(tok.special_ids) == list(range(12))  # byte pieces are plain vocabulary
    assert tok.decode(tok.encode("Zü<evi>"), skip_special_tokens=True) == "Zü"
    assert tok.encode("<0x41>") != [tok._tokenizer.token_to_id("<0x41>")]  # literal text, not a byte piece
    q = QFormerTokenizer(a[1])
    for text in CORPUS:
        assert 1 not in q.encode(text), text  # no [UNK] on the corpus
    assert q.vocab_size == sum(1 for _ in open(a[1])) + 1 <= 121
