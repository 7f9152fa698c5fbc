"""Parsing rendered responses (SPEC §5.4) into intervals, captions and choices."""

import pytest

from d2vlm_jax.evaluation import parsing


def test_render_then_parse_round_trip():
    text = f"The man opens the fridge at {parsing.render_interval(12.0, 15.5)}."
    assert parsing.render_interval(12.0, 15.5) == "12.0 - 15.5"
    assert parsing.parse_intervals(text) == [(12.0, 15.5)]


def test_split_response():
    grounding, answer = parsing.split_response("1.0 - 2.0, 5.0 - 6.0</evi> It is at 1.0 - 2.0.")
    assert grounding == "1.0 - 2.0, 5.0 - 6.0"
    assert answer == " It is at 1.0 - 2.0."
    assert parsing.split_response("no grounding stage") == (None, "no grounding stage")


@pytest.mark.parametrize("text,expected", [
    ("at 12.0 - 15.5 and 20 - 22.25 seconds", [(12.0, 15.5), (20.0, 22.25)]),
    ("from 15 - 12", [(12.0, 15.0)]),                      # reversed -> swapped
    ("between 3 to 7 seconds", [(3.0, 7.0)]),              # fallback pattern
    ("3.5-4", [(3.5, 4.0)]),                               # no spaces
    ("I cannot tell.", []),
    ("", []),
])
def test_parse_intervals(text, expected):
    assert parsing.parse_intervals(text) == expected


def test_parse_first_interval_and_point():
    assert parsing.parse_first_interval("x 1 - 3, then 5 - 9") == (1.0, 3.0)
    assert parsing.parse_first_interval("nothing") is None
    assert parsing.parse_point("highlight at 10.0 - 13.0") == 11.5
    assert parsing.parse_point("the best moment is 42.5 seconds") == 42.5  # official fallback
    assert parsing.parse_point("no number") is None


def test_parse_dense_captions_interval_first():
    text = "0.0 - 10.0, a man cuts onions. 30.0 - 40.0, he washes the dishes."
    assert parsing.parse_dense_captions(text) == [
        ((0.0, 10.0), "a man cuts onions"), ((30.0, 40.0), "he washes the dishes")]


def test_parse_dense_captions_caption_first_and_seconds_word():
    text = "A man cuts onions at 0.0 - 10.0 seconds. He fries them at 10.0 - 20.0 seconds."
    assert parsing.parse_dense_captions(text) == [
        ((0.0, 10.0), "A man cuts onions at"), ((10.0, 20.0), "He fries them at")]


def test_parse_dense_captions_unbalanced_and_empty():
    # Three intervals but only two captions: the extra interval is dropped.
    text = "0 - 5, first event here. 5 - 9, second event here. 9 - 12"
    assert parsing.parse_dense_captions(text) == [
        ((0.0, 5.0), "first event here"), ((5.0, 9.0), "second event here")]
    assert parsing.parse_dense_captions("a caption with no time") == []
    assert parsing.parse_dense_captions("") == []


@pytest.mark.parametrize("text,expected", [
    ("(B) the man in red", 1),
    ("The answer is (c).", 2),
    ("B. the man in red", 1),
    ("best option: (d)", 3),
    ("a", 0),
    ("  A) first", 0),
    ("(F) out of range", None),        # only 4 options
    ("Both are plausible", None),      # 'b' followed by a letter is a word, not a choice
    ("", None),
])
def test_parse_choice(text, expected):
    assert parsing.parse_choice(text, num_options=4) == expected


def test_parse_choice_bad_option_count():
    with pytest.raises(ValueError, match="num_options"):
        parsing.parse_choice("A", 0)
