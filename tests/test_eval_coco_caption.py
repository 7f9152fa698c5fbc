"""BLEU / ROUGE-L / CIDEr-D with coco-caption's arithmetic, and the caption tokenizer wrapper."""

import math
import random

import pytest

from d2vlm_jax.evaluation import coco_caption
from d2vlm_jax.evaluation.densevid import random_string, remove_nonascii


def test_bleu_smoothing_quirks_by_hand():
    scores = coco_caption.bleu({0: ["a b"]}, {0: ["a b"]})
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(1.0)
    # no 3-grams: (0 + 1e-15) / (0 + 1e-9) = 1e-6 enters the geometric mean
    assert scores[2] == pytest.approx(1e-6 ** (1 / 3), rel=1e-6)
    assert scores[3] == pytest.approx(1e-12 ** (1 / 4), rel=1e-6)
    # brevity penalty with the closest reference length (ties: the shorter one)
    short = coco_caption.bleu({0: ["a b c d", "a b"]}, {0: ["a b c"]})
    assert short[0] == pytest.approx(1.0)  # closest lengths 4 and 2 tie -> 2 < 3: no penalty


def test_rouge_l_by_hand_and_empty_caption():
    assert coco_caption.rouge_l({0: ["a c d"]}, {0: ["a b c"]}) == pytest.approx(2 / 3)
    assert coco_caption.rouge_l({0: ["a"]}, {0: [""]}) == 0.0  # "" is one empty token


def test_cider_is_zero_for_a_single_item_and_crashes_without_reference_ngrams():
    assert coco_caption.cider({0: ["a man walks"]}, {0: ["a man walks"]}) == 0.0  # log(1) = 0
    two = coco_caption.cider({0: ["a man walks"], 1: ["the dog sits"]},
                             {0: ["a man walks"], 1: ["a cat"]})
    assert two > 0
    with pytest.raises(coco_caption.CiderCrash):
        coco_caption.cider({0: [""]}, {0: ["x"]})


def test_random_strings_follow_the_random_module():
    a, b = random.Random(5), random.Random(5)
    first = random_string(a)
    length = b.randint(10, 20)
    assert first == "".join(b.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
    assert remove_nonascii("café…") == "caf  "


def test_python_tokenizer_backend_keeps_line_alignment():
    tokenizer = coco_caption.CaptionTokenizer("python")
    out = tokenizer.tokenize({0: [{"caption": "A man (walks)."}], 1: [{"caption": "x\ry"}],
                              2: [{"caption": "last one"}]})
    # "\r" is a line break for the PTB tokenizer: captions after it shift by a line, and the
    # last one falls off, as in coco-caption
    assert out == {0: ["a man -lrb- walks -rrb-"], 1: ["x"], 2: ["y"]}


def test_against_pycocoevalcap_when_installed():
    pytest.importorskip("pycocoevalcap.bleu.bleu")  # optional extra 'coco': an extra check
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    rng = random.Random(0)
    words = "a man the dog walks sits runs on table red".split()
    for _ in range(30):
        n = rng.randint(1, 5)
        gts = {k: [" ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))] for k in range(n)}
        res = {k: [" ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))] for k in range(n)}
        if not any(g[0] for g in gts.values()):
            continue
        theirs = Bleu(4).compute_score(gts, res, verbose=0)[0]
        assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
                   for a, b in zip(coco_caption.bleu(gts, res), theirs, strict=True))
        assert coco_caption.rouge_l(gts, res) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
        assert coco_caption.cider(gts, res) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
