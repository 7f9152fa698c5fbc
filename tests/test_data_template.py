"""D²VLM sequence layout (SPEC §2.1–2.2, §4.1): hand-written expected tokens and masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

from d2vlm_jax.batch import FPO_KEYS, HOST_KEYS, SFT_KEYS
from d2vlm_jax.data.template import (ExampleError, TemplateConfig, build_preference_example, build_sft_example,
                                     image_first_for)
from d2vlm_jax.data.tokenizer import QFormerTokenizer, TextTokenizer

SPECIALS = ["<unk>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<image>", "<evi>", "</evi>"]
WORDS = ["\n", "You", "are", "a", "helpful", "AI", "assistant", ".", ",", "?", "When", "does", "the", "person",
         "open", "opens", "fridge", "at", "The", "What", "happens", "after", "He", "cuts", "onions", "and", "closes",
         "fries", "them", "then", "leaves"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "when", "does", "the", "person", "open", "fridge", "?",
              "what", "happens", "after", "<", ">", "ev", "##i"]
IMG = 99  # image_token_id used by these tests (any id works: the model overwrites the slots)


def make_word_tokenizer(tmp_path) -> tuple[TextTokenizer, QFormerTokenizer]:
    """A word-level tokenizer whose ids can be written by hand: spaces separate tokens, "\\n"
    and punctuation are tokens of their own; the Phi-3 chat specials and <evi>/</evi> are
    special added tokens (no rstrip: every "\\n" of the template stays visible)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" "), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n|[.,?]"), behavior="isolated"),
    ])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    (tmp_path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    return TextTokenizer(path), QFormerTokenizer(tmp_path / "vocab.txt")


def ids(*tokens: str) -> list[int]:
    table = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    return [IMG if t == "IMG" else table[t] for t in tokens]


def bert(*tokens: str) -> list[int]:
    return [BERT_VOCAB.index(t) for t in tokens]


SYSTEM = ["<s>", "<|system|>", "\n", "You", "are", "a", "helpful", "AI", "assistant", ".", "<|end|>", "\n",
          "<|user|>", "\n"]
ASSISTANT_HEADER = ["<|end|>", "\n", "<|assistant|>", "\n"]
FRAME_TIMES = np.arange(6, dtype=np.float32)  # 1 fps: second = frame index


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return make_word_tokenizer(tmp_path_factory.mktemp("word_tok"))


def sft(sample, toks, **kw):
    config = kw.pop("config", TemplateConfig(image_token_id=IMG, train=False))
    return build_sft_example(sample, frame_times=kw.pop("frame_times", FRAME_TIMES), tokenizer=toks[0],
                             qformer_tokenizer=toks[1], config=config, **kw)


def placement_index(want_image_first: bool, seed: int = 0) -> int:
    config = TemplateConfig(train=True)
    return next(i for i in range(100) if image_first_for(i, seed, config) == want_image_first)


def test_image_before_question_exact_layout(toks):
    sample = {"video": "v.mp4", "duration": 6.0, "task": "tvg", "question": "When does the person open the fridge?",
              "answer": "The person opens the fridge at <evi>.", "events": [[2.0, 3.6]], "question_events": []}
    ex = sft(sample, toks, example_index=7)
    prefix = SYSTEM + ["IMG"] * 6 + ["\n", "When", "does", "the", "person", "open", "the", "fridge", "?"] \
        + ASSISTANT_HEADER
    np.testing.assert_array_equal(ex["prefix_ids"], ids(*prefix))
    np.testing.assert_array_equal(ex["frame_positions"], np.arange(14, 20))
    response = ["<evi>", "</evi>", "The", "person", "opens", "the", "fridge", "at", "<evi>", ".", "<|end|>"]
    np.testing.assert_array_equal(ex["response_ids"], ids(*response))
    np.testing.assert_array_equal(ex["response_loss_mask"], np.ones(11, bool))  # answer and final <|end|>
    np.testing.assert_array_equal(ex["evi_positions"], [0, 8])
    np.testing.assert_array_equal(ex["evi_event"], [0, 0])
    np.testing.assert_array_equal(ex["evi_stage"], [0, 1])
    np.testing.assert_array_equal(ex["event_intervals"], [[2, 4]])  # 3.6 s rounds to frame 4
    assert ex["question_evi_positions"].shape == (0,) and ex["question_evi_intervals"].shape == (0, 2)
    np.testing.assert_array_equal(ex["qformer_ids"],
                                  bert("[CLS]", "when", "does", "the", "person", "open", "the", "fridge", "?", "[SEP]"))
    assert ex["example_id"] == 7 and ex["example_id"].dtype == np.int64
    np.testing.assert_array_equal(ex["frame_times"], FRAME_TIMES)
    assert ex["prefix_valid"].all() and ex["frame_valid"].shape == (6,) and ex["frame_valid"].all()


def test_image_after_question_with_question_evidence(toks):
    index = placement_index(want_image_first=False, seed=3)
    sample = {"video": "v.mp4", "duration": 6.0, "task": "dvc", "question": "What happens after <evi>?",
              "answer": "He cuts onions <evi> and opens the fridge <evi>.",
              "events": [[3.0, 4.2], [0.4, 7.9]], "question_events": [[2.4, 1.2]]}
    ex = sft(sample, toks, config=TemplateConfig(image_token_id=IMG, train=True), rng_seed=3, example_index=index)
    prefix = SYSTEM + ["What", "happens", "after", "<evi>", "?", "\n"] + ["IMG"] * 6 + ASSISTANT_HEADER
    np.testing.assert_array_equal(ex["prefix_ids"], ids(*prefix))
    np.testing.assert_array_equal(ex["frame_positions"], np.arange(20, 26))
    np.testing.assert_array_equal(ex["question_evi_positions"], [17])
    np.testing.assert_array_equal(ex["question_evi_intervals"], [[1, 2]])  # reversed -> swapped
    np.testing.assert_array_equal(ex["question_evi_valid"], [True])
    response = ["<evi>", ",", "<evi>", "</evi>", "He", "cuts", "onions", "<evi>", "and", "opens", "the", "fridge",
                "<evi>", ".", "<|end|>"]
    np.testing.assert_array_equal(ex["response_ids"], ids(*response))
    np.testing.assert_array_equal(ex["evi_positions"], [0, 2, 7, 12])
    np.testing.assert_array_equal(ex["evi_event"], [0, 1, 0, 1])
    np.testing.assert_array_equal(ex["evi_stage"], [0, 0, 1, 1])
    np.testing.assert_array_equal(ex["event_intervals"], [[3, 4], [0, 5]])  # 7.9 s clipped to the last frame
    # Q-Former sees the question text without <image> (the authors' "query").
    np.testing.assert_array_equal(ex["qformer_ids"],
                                  bert("[CLS]", "what", "happens", "after", "<", "ev", "##i", ">", "?", "[SEP]"))


def test_no_event_response_is_bare_grounding_close(toks):
    sample = {"video": "v.mp4", "duration": 6.0, "task": "rvq", "question": "What happens?",
              "answer": "He cuts onions.", "events": [], "question_events": []}
    ex = sft(sample, toks)
    np.testing.assert_array_equal(ex["response_ids"], ids("</evi>", "He", "cuts", "onions", ".", "<|end|>"))
    assert ex["evi_positions"].shape == (0,) and ex["event_intervals"].shape == (0, 2)


def test_example_keys_are_the_batch_contract(toks):
    sample = {"video": "v.mp4", "duration": 6.0, "task": "tvg", "question": "What happens?",
              "answer": "He cuts onions <evi>.", "events": [[1, 2]], "question_events": [],
              "rejected": [{"answer": "He cuts onions <evi>.", "events": [[3, 4]], "family": "shift",
                            "event_index": 0}]}
    ex = sft(sample, toks)
    assert set(ex) | {"frames"} == set(SFT_KEYS) | set(HOST_KEYS)
    pref = build_preference_example(sample, frame_times=FRAME_TIMES, tokenizer=toks[0], qformer_tokenizer=toks[1],
                                    config=TemplateConfig(image_token_id=IMG, train=False))
    assert set(pref) | {"frames"} == set(FPO_KEYS) | set(HOST_KEYS)
    for key in SFT_KEYS[1:]:
        np.testing.assert_array_equal(pref[key], ex[key], err_msg=key)


def test_placement_is_deterministic_and_balanced(toks):
    train = TemplateConfig(train=True)
    draws = [image_first_for(i, 0, train) for i in range(2000)]
    assert draws == [image_first_for(i, 0, train) for i in range(2000)]
    assert 0.45 < np.mean(draws) < 0.55
    assert draws != [image_first_for(i, 1, train) for i in range(2000)]  # the seed matters
    assert all(image_first_for(i, 0, dataclasses.replace(train, train=False)) for i in range(50))
    sample = {"video": "v.mp4", "duration": 6.0, "task": "tvg", "question": "What happens?",
              "answer": "He cuts onions <evi>.", "events": [[1, 2]], "question_events": []}
    config = TemplateConfig(image_token_id=IMG, train=True)
    first = sft(sample, toks, config=config, rng_seed=0, example_index=placement_index(True))
    after = sft(sample, toks, config=config, rng_seed=0, example_index=placement_index(False))
    again = sft(sample, toks, config=config, rng_seed=0, example_index=placement_index(False))
    assert first["frame_positions"][0] == 14 and after["frame_positions"][0] > 14
    for key in after:
        if key != "example_id":
            np.testing.assert_array_equal(after[key], again[key], err_msg=key)


def test_schema_sample_objects_are_accepted(toks):
    from d2vlm_jax.data.schema import Sample

    sample = Sample(video="v.mp4", duration=6.0, task="tvg", question="What happens?",
                           answer="He cuts onions <evi>.", events=((1.0, 2.0),))
    ex = sft(sample, toks)
    np.testing.assert_array_equal(ex["event_intervals"], [[1, 2]])


@pytest.mark.parametrize("field,change,message", [
    ("events", {"events": [[1, 2], [2, 3]]}, "answer has 1 <evi> but 2 event"),
    ("question_events", {"question_events": [[1, 2]]}, "1 interval(s) for 0 <evi>"),
    ("answer", {"answer": "He cuts </evi> onions <evi>."}, "contains '</evi>'"),
    ("question", {"question": "<image> What happens?"}, "contains '<image>'"),
])
def test_bad_annotations_name_sample_and_field(toks, field, change, message):
    sample = {"video": "bad.mp4", "duration": 6.0, "task": "tvg", "question": "What happens?",
              "answer": "He cuts onions <evi>.", "events": [[1, 2]], "question_events": []}
    sample.update(change)
    with pytest.raises(ExampleError) as err:
        sft(sample, toks, example_index=5)
    assert "sample 5 (video 'bad.mp4'" in str(err.value)
    assert err.value.field == field
    assert message in str(err.value)


def test_missing_fields_are_named(toks):
    with pytest.raises(ExampleError, match=r"sample 4 \(video 'm.mp4'.*field 'answer': missing"):
        sft({"video": "m.mp4", "task": "tvg", "question": "What happens?", "events": []}, toks, example_index=4)
    with pytest.raises(ExampleError, match=r"field 'rejected\[1\]\.events': missing"):
        pref(toks, [{"answer": "He cuts onions <evi>.", "events": [[0, 0]]}, {"answer": "He cuts onions <evi>."}])


def test_over_long_sequence_raises_with_sample_name(toks):
    sample = {"video": "long.mp4", "duration": 6.0, "task": "tvg", "question": "What happens?",
              "answer": "He cuts onions <evi>.", "events": [[1, 2]], "question_events": []}
    ex = sft(sample, toks)
    total = ex["prefix_ids"].size + ex["response_ids"].size
    sft(sample, toks, config=TemplateConfig(image_token_id=IMG, train=False, max_length=total))  # fits exactly
    with pytest.raises(ExampleError, match=r"sample 2 \(video 'long.mp4'.*too long.*> max_length"):
        sft(sample, toks, config=TemplateConfig(image_token_id=IMG, train=False, max_length=total - 1),
            example_index=2)


# ---------------------------------------------------------------------------- preference conflicts

CHOSEN = {"video": "p.mp4", "duration": 6.0, "task": "dvc", "question": "What happens?",
          "answer": "He cuts onions <evi> and opens the fridge <evi>.", "events": [[3, 4], [1, 2]],
          "question_events": []}
# chosen response: 0 <evi> 1 , 2 <evi> 3 </evi> 4 He 5 cuts 6 onions 7 <evi> 8 and 9 opens 10 the
#                  11 fridge 12 <evi> 13 . 14 <|end|>


def pref(toks, rejected):
    return build_preference_example(CHOSEN, rejected, frame_times=FRAME_TIMES, tokenizer=toks[0],
                                    qformer_tokenizer=toks[1], config=TemplateConfig(image_token_id=IMG, train=False),
                                    example_index=11)


def mask_from(indices, size):
    out = np.zeros(size, bool)
    out[list(indices)] = True
    return out


def test_text_perturbation_conflict(toks):
    ex = pref(toks, [{"answer": "He cuts onions <evi> and closes the fridge <evi>.", "events": [[3, 4], [1, 2]],
                      "family": "text_replace", "event_index": 1}])
    # first difference: token 9 (opens / closes) -> tokens >= 9, evidences at index >= 9
    np.testing.assert_array_equal(ex["conflict_token_mask"][0], mask_from(range(9, 15), 15))
    np.testing.assert_array_equal(ex["conflict_evi_mask"][0], [False, False, False, True])
    np.testing.assert_array_equal(ex["rejected_conflict_token_mask"][0], mask_from(range(9, 15), 15))
    np.testing.assert_array_equal(ex["rejected_conflict_evi_mask"][0], [False, False, False, True])
    np.testing.assert_array_equal(ex["rejected_ids"][0], ids("<evi>", ",", "<evi>", "</evi>", "He", "cuts", "onions",
                                                             "<evi>", "and", "closes", "the", "fridge", "<evi>", ".",
                                                             "<|end|>"))


def test_temporal_perturbation_conflict(toks):
    ex = pref(toks, [{"answer": CHOSEN["answer"], "events": [[3, 4], [2, 5]], "family": "temporal_shift",
                      "event_index": 1}])
    # same tokens; the <evi> at index 2 (event 1) has another interval -> tokens > 2, evidences >= 2
    np.testing.assert_array_equal(ex["conflict_token_mask"][0], mask_from(range(3, 15), 15))
    np.testing.assert_array_equal(ex["conflict_evi_mask"][0], [False, True, True, True])
    np.testing.assert_array_equal(ex["rejected_conflict_token_mask"][0], mask_from(range(3, 15), 15))
    np.testing.assert_array_equal(ex["rejected_conflict_evi_mask"][0], [False, True, True, True])
    np.testing.assert_array_equal(ex["rejected_event_intervals"][0], [[3, 4], [2, 5]])
    np.testing.assert_array_equal(ex["rejected_ids"][0], ex["response_ids"])


def test_inserted_event_conflicts(toks):
    # (a) inserted at the end: grounding stage "<evi> , <evi> , <evi> </evi>" -> first token difference at
    # index 3 (</evi> vs ","); the <evi> at 0 and 2 keep their intervals.
    at_end = {"answer": "He cuts onions <evi> and opens the fridge <evi> , then leaves <evi>.",
              "events": [[3, 4], [1, 2], [5, 5]], "family": "insert", "event_index": 2}
    # (b) inserted in the middle: the <evi> at index 2 now refers to the new event (another interval) before any
    # token differs -> an interval difference at index 2.
    middle = {"answer": "He cuts onions <evi> , fries them <evi> and opens the fridge <evi>.",
              "events": [[3, 4], [4, 5], [1, 2]], "family": "insert", "event_index": 1}
    ex = pref(toks, [at_end, middle])
    rej_end = ids("<evi>", ",", "<evi>", ",", "<evi>", "</evi>", "He", "cuts", "onions", "<evi>", "and", "opens",
                  "the", "fridge", "<evi>", ",", "then", "leaves", "<evi>", ".", "<|end|>")
    np.testing.assert_array_equal(ex["rejected_ids"][0, :21], rej_end)
    np.testing.assert_array_equal(ex["rejected_evi_positions"][0], [0, 2, 4, 9, 14, 18])
    np.testing.assert_array_equal(ex["rejected_evi_event"][0], [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(ex["rejected_evi_stage"][0], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ex["conflict_token_mask"][0], mask_from(range(3, 15), 15))
    np.testing.assert_array_equal(ex["conflict_evi_mask"][0], [False, False, True, True])
    np.testing.assert_array_equal(ex["rejected_conflict_token_mask"][0], mask_from(range(3, 21), 21))
    np.testing.assert_array_equal(ex["rejected_conflict_evi_mask"][0], [False, False, True, True, True, True])

    rej_mid_len = len(ids("<evi>", ",", "<evi>", ",", "<evi>", "</evi>", "He", "cuts", "onions", "<evi>", ",", "fries",
                          "them", "<evi>", "and", "opens", "the", "fridge", "<evi>", ".", "<|end|>"))
    assert ex["rejected_valid"][1].sum() == rej_mid_len == 21
    np.testing.assert_array_equal(ex["conflict_token_mask"][1], mask_from(range(3, 15), 15))
    np.testing.assert_array_equal(ex["conflict_evi_mask"][1], [False, True, True, True])
    np.testing.assert_array_equal(ex["rejected_conflict_token_mask"][1], mask_from(range(3, 21), 21))
    np.testing.assert_array_equal(ex["rejected_conflict_evi_mask"][1], [False, True, True, True, True, True])
    np.testing.assert_array_equal(ex["rejected_valid_pair"], [True, True])


def test_branches_of_different_lengths_are_padded_within_the_example(toks):
    shorter = {"answer": "He cuts onions <evi>.", "events": [[3, 4]], "family": "delete", "event_index": 1}
    longer = {"answer": "He cuts onions <evi> and opens the fridge <evi> , then leaves <evi>.",
              "events": [[3, 4], [1, 2], [5, 5]], "family": "insert", "event_index": 2}
    ex = pref(toks, [shorter, longer])
    assert ex["rejected_ids"].shape == (2, 21) and ex["rejected_evi_positions"].shape == (2, 6)
    assert ex["rejected_event_intervals"].shape == (2, 3, 2)
    np.testing.assert_array_equal(ex["rejected_ids"][0, :7], ids("<evi>", "</evi>", "He", "cuts", "onions", "<evi>",
                                                                 "."))
    assert ex["rejected_valid"][0].sum() == 8 and not ex["rejected_valid"][0, 8:].any()
    assert not ex["rejected_ids"][0, 8:].any() and not ex["rejected_conflict_token_mask"][0, 8:].any()
    np.testing.assert_array_equal(ex["rejected_evi_valid"][0], [True, True, False, False, False, False])
    np.testing.assert_array_equal(ex["rejected_event_valid"][0], [True, False, False])
    # deletion: first difference at index 1 ("," vs "</evi>") on both sides
    np.testing.assert_array_equal(ex["conflict_token_mask"][0], mask_from(range(1, 15), 15))
    np.testing.assert_array_equal(ex["rejected_conflict_token_mask"][0], mask_from(range(1, 8), 21))
    np.testing.assert_array_equal(ex["rejected_conflict_evi_mask"][0], [False, True, False, False, False, False])


def test_rejected_identical_to_chosen_is_an_error(toks):
    same = {"answer": CHOSEN["answer"], "events": [[3.2, 4.1], [1, 2]], "family": "temporal_shift",
            "event_index": 0}  # 3.2 s and 4.1 s land on the same frames as 3 s and 4 s
    with pytest.raises(ExampleError, match=r"sample 11 .*'rejected\[0\]'.*identical"):
        pref(toks, [same])
    with pytest.raises(ExampleError, match="rejected"):
        pref(toks, [])


def test_rejected_too_long_is_checked_per_branch(toks):
    long_rej = {"answer": "He cuts onions <evi> and opens the fridge <evi> , then leaves <evi>.",
                "events": [[3, 4], [1, 2], [5, 5]], "family": "insert", "event_index": 2}
    base = pref(toks, [long_rej])
    p = base["prefix_ids"].size
    config = TemplateConfig(image_token_id=IMG, train=False, max_length=p + 15)  # chosen fits, rejected (21) not
    with pytest.raises(ExampleError, match=r"'rejected\[0\]\.answer'.*too long"):
        build_preference_example(CHOSEN, [long_rej], frame_times=FRAME_TIMES, tokenizer=toks[0],
                                 qformer_tokenizer=toks[1], config=config)


@pytest.mark.parametrize("prefix_space", [None, "never"])
def test_phi3_structured_tokenizer_matches_one_string_tokenization(tmp_path, prefix_space):
    """With a Phi-3-like tokenizer.json (rstrip chat markers, <s>), the example equals the authors'
    tokenization: BOS + ids(text before <image>) + N slots + ids(text after <image> + response, one string)."""
    from tests.test_data_tokenizer import write_phi3_like

    tok = TextTokenizer(write_phi3_like(tmp_path), prefix_space=prefix_space)
    (tmp_path / "words").mkdir()
    qtok = make_word_tokenizer(tmp_path / "words")[1]
    sample = {"video": "v.mp4", "duration": 6.0, "task": "tvg", "question": "  When does the person open it? ",
              "answer": "The person opens the fridge at <evi>.", "events": [[2, 3]], "question_events": []}
    config = TemplateConfig(image_token_id=0, train=False)
    ex = build_sft_example(sample, frame_times=FRAME_TIMES, tokenizer=tok, qformer_tokenizer=qtok, config=config)
    before = "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n"
    after = "\nWhen does the person open it?<|end|>\n<|assistant|>\n"
    response = "<evi></evi> The person opens the fridge at <evi>.<|end|>"
    want = [1] + tok.encode(before) + [0] * 6 + tok.encode(after + response)
    np.testing.assert_array_equal(np.concatenate([ex["prefix_ids"], ex["response_ids"]]), want)
    assert ex["prefix_ids"][-1] == tok.token_id("<|assistant|>")  # rstrip absorbed the "\n"
    assert ex["response_ids"][0] == tok.evi_id and ex["response_ids"][-1] == tok.end_id
    np.testing.assert_array_equal(ex["frame_positions"], np.arange(1 + len(tok.encode(before)), 7 + len(
        tok.encode(before))))


def test_preference_example_keeps_unrounded_event_positions(toks):
    # 1 fps: positions are the seconds themselves; the frame intervals are their rounding
    ex = pref(toks, [{"answer": CHOSEN["answer"], "events": [[3.3, 4.6], [5.4, 2.2]], "family": "temporal_shift",
                      "event_index": 1}])
    np.testing.assert_array_equal(ex["rejected_event_intervals"][0], [[3, 5], [2, 5]])
    np.testing.assert_allclose(ex["rejected_event_frame_positions"][0], [[3.3, 4.6], [2.2, 5.4]], rtol=1e-6)
    np.testing.assert_allclose(ex["event_frame_positions"], [[3, 4], [1, 2]])
    assert ex["event_frame_positions"].dtype == np.float32


def test_seconds_to_frame_positions():
    from d2vlm_jax.data.template import seconds_to_frame_positions
    times = np.array([0.5, 1.0, 1.5, 2.0])            # 2 fps from 0.5 s
    assert seconds_to_frame_positions(0.75, 1.25, times) == (0.5, 1.5)
    assert seconds_to_frame_positions(0.0, 3.0, times) == (-1.0, 5.0)    # extrapolated past the clip
    assert seconds_to_frame_positions(1.25, 0.75, times) == (0.5, 1.5)   # reversed: swapped
    assert seconds_to_frame_positions(4.0, 7.0, np.array([3.0])) == (0.0, 0.0)
