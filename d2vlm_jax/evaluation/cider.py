"""CIDEr-D, following the standard coco-caption definition (``pycocoevalcap`` CiderScorer).

For a candidate ``c`` with references ``S`` (one "image" = one item of the corpus):

* n-grams of order 1..4; term weights ``tf * (log(|corpus|) - log(max(1, df)))`` with the
  document frequency ``df`` counted over the *references* of the whole corpus (an n-gram
  counts once per item);
* per order: the clipped cosine ``sum_g min(v_c[g], v_s[g]) * v_s[g] / (|v_c| |v_s|)``
  (0 when either norm is 0), times the length penalty ``exp(-(l_c - l_s)^2 / (2 sigma^2))``,
  sigma = 6, where the "length" is the number of **bigrams** (a quirk of the reference
  implementation, kept);
* item score = 10 * mean over the 4 orders of the mean over references; the corpus score is
  the mean over items.

A corpus of a single item has ``log(|corpus|) = 0`` and scores 0, exactly as the reference
implementation does (dense-captioning evaluators compute CIDEr per video, so this matters).

Tokenization approximates coco-caption's PTBTokenizer (Stanford CoreNLP): lower case,
clitics split (``don't -> do n't``, ``man's -> man 's``), punctuation dropped, hyphenated
words and decimals kept whole. Uncommon constructions may tokenize differently from the
Java tokenizer; scores are then not bit-identical to the reference implementation.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence

_CLITIC = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_NEGATION = re.compile(r"(\w)n't\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-.][a-z0-9]+)*")

MAX_ORDER = 4
SIGMA = 6.0


def tokenize_caption(text: str) -> list[str]:
    """PTB-like tokens of a caption (lower case, punctuation removed)."""
    text = text.lower()
    text = _NEGATION.sub(r"\1 n't", text)
    text = _CLITIC.sub(r"\1 '\2", text)
    return _TOKEN.findall(text)


def _ngram_counts(tokens: Sequence[str], max_order: int = MAX_ORDER) -> Counter:
    counts: Counter = Counter()
    for order in range(1, max_order + 1):
        for start in range(len(tokens) - order + 1):
            counts[tuple(tokens[start:start + order])] += 1
    return counts


def _to_vector(counts: Counter, document_frequency: Mapping, log_corpus_size: float
               ) -> tuple[list[dict], list[float], int]:
    vector: list[dict] = [defaultdict(float) for _ in range(MAX_ORDER)]
    norm = [0.0] * MAX_ORDER
    bigram_length = 0
    for ngram, term_frequency in counts.items():
        order = len(ngram) - 1
        weight = term_frequency * (log_corpus_size
                                   - math.log(max(1.0, document_frequency.get(ngram, 0.0))))
        vector[order][ngram] = weight
        norm[order] += weight * weight
        if order == 1:
            bigram_length += term_frequency
    return vector, [math.sqrt(n) for n in norm], bigram_length


def _similarity(candidate, reference, sigma: float) -> list[float]:
    vec_c, norm_c, length_c = candidate
    vec_r, norm_r, length_r = reference
    delta = float(length_c - length_r)
    penalty = math.exp(-(delta ** 2) / (2 * sigma ** 2))
    values = []
    for order in range(MAX_ORDER):
        value = 0.0
        for ngram, weight in vec_c[order].items():
            ref_weight = vec_r[order].get(ngram, 0.0)
            value += min(weight, ref_weight) * ref_weight
        if norm_c[order] != 0 and norm_r[order] != 0:
            value /= norm_c[order] * norm_r[order]
        values.append(value * penalty)
    return values


def cider_d(references: Mapping[Hashable, Sequence[Sequence[str]]],
            candidates: Mapping[Hashable, Sequence[str]],
            sigma: float = SIGMA) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D of pre-tokenized candidates against their references.

    Args:
      references: item key -> list of references, each a list of tokens (a reference may be
        empty: it matches nothing, which is how unmatched predictions are scored).
      candidates: item key -> candidate tokens; same keys as ``references``.
      sigma: length-penalty width (6 in CIDEr-D).

    Returns:
      (corpus score, per-item scores). An empty corpus scores 0.
    """
    if set(references) != set(candidates):
        raise ValueError("cider_d: references and candidates must have the same keys")
    keys = list(candidates)
    if not keys:
        return 0.0, {}
    for key in keys:
        if len(references[key]) == 0:
            raise ValueError(f"cider_d: item {key!r} has no reference")
    reference_counts = {k: [_ngram_counts(r) for r in references[k]] for k in keys}
    document_frequency: Counter = Counter()
    for key in keys:
        for ngram in set(g for counts in reference_counts[key] for g in counts):
            document_frequency[ngram] += 1
    log_corpus_size = math.log(float(len(keys)))

    scores = {}
    for key in keys:
        candidate = _to_vector(_ngram_counts(candidates[key]), document_frequency, log_corpus_size)
        per_order = [0.0] * MAX_ORDER
        for counts in reference_counts[key]:
            reference = _to_vector(counts, document_frequency, log_corpus_size)
            for order, value in enumerate(_similarity(candidate, reference, sigma)):
                per_order[order] += value
        score = sum(per_order) / MAX_ORDER / len(reference_counts[key]) * 10.0
        scores[key] = score
    return sum(scores.values()) / len(scores), scores


def cider_d_text(references: Mapping[Hashable, Sequence[str]],
                 candidates: Mapping[Hashable, str]) -> tuple[float, dict[Hashable, float]]:
    """:func:`cider_d` on raw caption strings (tokenized with :func:`tokenize_caption`)."""
    return cider_d({k: [tokenize_caption(r) for r in refs] for k, refs in references.items()},
                   {k: tokenize_caption(c) for k, c in candidates.items()})
