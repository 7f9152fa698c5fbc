"""Caption metrics as the coco-caption toolkit (``pycocoevalcap``) computes them.

E.T. Bench scores dense captions with coco-caption's PTB tokenizer, BLEU-1..4, METEOR,
ROUGE-L and CIDEr(-D), called per video. BLEU, ROUGE-L and CIDEr are reimplemented here
with the toolkit's exact arithmetic (smoothing constants, ``closest`` reference length,
``split(" ")`` vs ``split()``, CIDEr's per-call document frequency and bigram-count length
penalty). METEOR is a Java program with WordNet and paraphrase tables; it is only run
through ``pycocoevalcap``'s own jar when that package and ``java`` are installed, else it
is reported unavailable (None).

Tokenization (``PTBTokenizer``: Stanford CoreNLP 3.4.1 with ``-preserveLines -lowerCase``,
then punctuation tokens dropped) has two back ends: ``"stanford"`` runs the jar that
``pycocoevalcap`` ships (exact by construction); ``"python"`` is
:func:`d2vlm_jax.evaluation.ptb.tokenize_lines`, a reimplementation of the jar on any text
(checked against it by ``tools/crosscheck_ptb_tokenizer.py``). ``"auto"`` takes the jar
when it can run.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from d2vlm_jax.evaluation import ptb

PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                ":", "-", "--", "...", ";")
"""Tokens coco-caption drops after tokenization. Upper-case bracket names: the lower-cased
``-lrb-`` etc. that the tokenizer actually writes are kept (a toolkit quirk)."""


# ------------------------------------------------------------------------- tokenizer

def _pycocoevalcap_dir() -> str | None:
    try:
        import pycocoevalcap  # noqa: PLC0415  (optional)
    except ImportError:
        return None
    paths = list(getattr(pycocoevalcap, "__path__", []))  # a namespace package: no __init__
    return os.path.abspath(paths[0]) if paths else None


def stanford_jar() -> str | None:
    """Path of ``stanford-corenlp-3.4.1.jar`` when ``pycocoevalcap`` and ``java`` exist."""
    base = _pycocoevalcap_dir()
    if base is None or shutil.which("java") is None:
        return None
    jar = os.path.join(base, "tokenizer", "stanford-corenlp-3.4.1.jar")
    return jar if os.path.isfile(jar) else None


def _stanford_lines(text: str, jar: str, java: str = "java") -> list[str]:
    with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".txt") as f:
        f.write(text.encode())
        path = f.name
    try:
        out = subprocess.run([java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                              "-preserveLines", "-lowerCase", path],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True)
    finally:
        os.remove(path)
    return out.stdout.decode().split("\n")


class CaptionTokenizer:
    """``PTBTokenizer.tokenize``: ``{key: [{"caption": str}, ...]}`` -> ``{key: [tokens str]}``.

    The captions are joined into one text, one line each (``\\n`` inside a caption becomes a
    space), tokenized line-preserving, and the output lines are zipped back onto the keys
    in order -- so a caption holding another line break (``\\r``, ``\\x0b``, ``\\x0c``)
    shifts every later caption by a line, exactly as in coco-caption.

    Args:
      backend: ``auto`` (the jar when it can run, else Python), ``stanford`` or ``python``.
      jar: an explicit ``stanford-corenlp-3.4.1.jar`` (default: ``pycocoevalcap``'s).
      python_lines: the Python back end, ``text -> lines`` (default
        :func:`d2vlm_jax.evaluation.ptb.tokenize_lines`).
      java: the Java executable.
    """

    def __init__(self, backend: str = "auto", jar: str | None = None,
                 python_lines: Callable[[str], list[str]] | None = None, java: str = "java"):
        if backend not in ("auto", "stanford", "python"):
            raise ValueError(f"caption tokenizer backend must be auto|stanford|python, got {backend!r}")
        if jar is not None and not os.path.isfile(jar):
            raise ValueError(f"PTB tokenizer jar not found: {jar}")
        if jar is not None and shutil.which(java) is None:
            raise ValueError(f"PTB tokenizer jar {jar} given but no {java!r} to run it")
        self.jar = (jar or stanford_jar()) if backend in ("auto", "stanford") else None
        if backend == "stanford" and self.jar is None:
            raise ValueError("caption tokenizer 'stanford' needs pycocoevalcap and java")
        self.backend = "stanford" if self.jar else "python"
        self.java = java
        self.python_lines = python_lines or ptb.tokenize_lines

    def lines(self, text: str) -> list[str]:
        if self.jar is not None:
            return _stanford_lines(text, self.jar, self.java)
        return self.python_lines(text)

    def tokenize(self, captions: Mapping) -> dict:
        keys = [k for k, v in captions.items() for _ in range(len(v))]
        text = "\n".join(c["caption"].replace("\n", " ") for v in captions.values() for c in v)
        out: dict = {}
        for key, line in zip(keys, self.lines(text)):
            tokens = [w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS]
            out.setdefault(key, []).append(" ".join(tokens))
        return out


# ------------------------------------------------------------------------------ BLEU

def _ngrams(words: Sequence[str], n: int = 4) -> dict:
    counts: dict = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def bleu(gts: Mapping, res: Mapping, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of ``pycocoevalcap.bleu.Bleu`` (``option='closest'``).

    Per item: clipped n-gram matches against the max count over its references, the
    reference length closest to the hypothesis length (ties: the shorter); corpus totals;
    ``prod_k (correct_k + 1e-15) / (guess_k + 1e-9)`` to the power ``1/k``; brevity penalty
    ``exp(1 - 1/ratio)`` when ``ratio = (testlen + 1e-15) / (reflen + 1e-9) < 1``.
    """
    small, tiny = 1e-9, 1e-15
    testlen_total, reflen_total = 0, 0
    guess, correct = [0] * n, [0] * n
    for key in gts:
        hypothesis, references = res[key], gts[key]
        assert isinstance(hypothesis, list) and len(hypothesis) == 1 and len(references) >= 1
        ref_lengths, max_counts = [], {}
        for ref in references:
            words = ref.split()
            ref_lengths.append(len(words))
            for ngram, count in _ngrams(words, n).items():
                max_counts[ngram] = max(max_counts.get(ngram, 0), count)
        words = hypothesis[0].split()
        testlen = len(words)
        reflen = min((abs(length - testlen), length) for length in ref_lengths)[1]
        testlen_total += testlen
        reflen_total += reflen
        for k in range(n):
            guess[k] += max(0, testlen - k)
        for ngram, count in _ngrams(words, n).items():
            correct[len(ngram) - 1] += min(max_counts.get(ngram, 0), count)
    scores, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen_total + tiny) / (reflen_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# --------------------------------------------------------------------------- ROUGE-L

def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    lengths = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for j in range(1, len(b) + 1):
        for i in range(1, len(a) + 1):
            lengths[i][j] = (lengths[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1]
                             else max(lengths[i - 1][j], lengths[i][j - 1]))
    return lengths[len(a)][len(b)]


def rouge_l(gts: Mapping, res: Mapping, beta: float = 1.2) -> float:
    """Mean ROUGE-L F (beta 1.2) of ``pycocoevalcap.rouge.Rouge``: tokens by ``split(" ")``
    (an empty caption is one empty token), max precision and max recall over references."""
    scores = []
    for key in gts:
        candidate = res[key][0].split(" ")
        precisions, recalls = [], []
        for reference in gts[key]:
            tokens = reference.split(" ")
            common = _lcs(tokens, candidate)
            precisions.append(common / float(len(candidate)))
            recalls.append(common / float(len(tokens)))
        p, r = max(precisions), max(recalls)
        scores.append(((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p) if p != 0 and r != 0
                      else 0.0)
    return float(np.mean(np.array(scores)))


# ----------------------------------------------------------------------------- CIDEr

class CiderCrash(Exception):
    """``pycocoevalcap``'s CIDEr would raise (no reference n-gram at all: ``max()`` of an
    empty document-frequency table)."""


def cider(gts: Mapping, res: Mapping, n: int = 4, sigma: float = 6.0) -> float:
    """``pycocoevalcap.cider.Cider().compute_score`` (CIDEr-D): document frequency over the
    references of THIS call, ``log(#items)`` idf base, tf-idf clipped cosine per order,
    length penalty on the bigram count, ``10 * mean(orders) / #refs``, mean over items."""
    refs = [[_ngrams(r.split(), n) for r in gts[key]] for key in gts]
    tests = [_ngrams(res[key][0].split(), n) for key in gts]
    frequency: dict = defaultdict(float)
    for item_refs in refs:
        for ngram in {g for ref in item_refs for g in ref}:
            frequency[ngram] += 1
    if not frequency:
        raise CiderCrash("CIDEr: no reference n-gram (max() of an empty sequence)")
    ref_len = np.log(float(len(refs)))

    def vector(counts):
        vec = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, term_freq in counts.items():
            df = np.log(max(1.0, frequency[ngram]))
            order = len(ngram) - 1
            vec[order][ngram] = float(term_freq) * (ref_len - df)
            norm[order] += pow(vec[order][ngram], 2)
            if order == 1:
                length += term_freq
        return vec, [np.sqrt(x) for x in norm], length

    scores = []
    for test, item_refs in zip(tests, refs):
        vec, norm, length = vector(test)
        score = np.array([0.0] * n)
        for ref in item_refs:
            vec_ref, norm_ref, length_ref = vector(ref)
            delta = float(length - length_ref)
            val = np.array([0.0] * n)
            for order in range(n):
                for ngram in vec[order]:
                    val[order] += min(vec[order][ngram], vec_ref[order][ngram]) * vec_ref[order][ngram]
                if norm[order] != 0 and norm_ref[order] != 0:
                    val[order] /= norm[order] * norm_ref[order]
                val[order] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
            score += val
        scores.append(np.mean(score) / len(item_refs) * 10.0)
    return float(np.mean(np.array(scores)))


# ---------------------------------------------------------------------------- METEOR

class Meteor:
    """METEOR 1.5 through a ``meteor-1.5.jar`` (``-stdio -l en -norm``), one process.

    Args:
      jar: the jar to run (its ``data/paraphrase-en.gz`` beside it); default:
        ``pycocoevalcap``'s own. ``available`` is False without a jar or ``java``;
        :meth:`score` then returns None.
      java: the Java executable.
    """

    def __init__(self, jar: str | None = None, java: str = "java"):
        self.process = None
        if jar is None:
            base = _pycocoevalcap_dir()
            jar = os.path.join(base, "meteor", "meteor-1.5.jar") if base else None
        elif not os.path.isfile(jar):
            raise ValueError(f"METEOR jar not found: {jar}")
        if jar is None or not os.path.isfile(jar) or shutil.which(java) is None:
            return
        self.process = subprocess.Popen(
            [java, "-jar", "-Xmx2G", os.path.basename(jar), "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=os.path.dirname(os.path.abspath(jar)), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, np.ndarray]:
        """coco-caption's ``Meteor.compute_score``: items in SORTED key order; returns the
        jar's corpus score and the per-item scores (in that order)."""
        if self.process is None:
            raise RuntimeError("METEOR is not available (no jar or no java)")
        if sorted(gts) != sorted(res):
            raise ValueError("METEOR: references and hypotheses must have the same keys")
        keys = sorted(gts)
        line = "EVAL"
        for key in keys:
            hypothesis = res[key][0].replace("|||", "").replace("  ", " ")
            request = " ||| ".join(("SCORE", " ||| ".join(gts[key]), hypothesis))
            self.process.stdin.write(f"{request}\n".encode())
            self.process.stdin.flush()
            line += " ||| " + self.process.stdout.readline().decode().strip()
        self.process.stdin.write(f"{line}\n".encode())
        self.process.stdin.flush()
        scores = [float(self.process.stdout.readline().decode()) for _ in keys]
        return float(self.process.stdout.readline().strip()), np.asarray(scores)

    @property
    def available(self) -> bool:
        return self.process is not None

    def score(self, gts: Mapping, res: Mapping) -> float | None:
        if self.process is None:
            return None
        line = "EVAL"
        for key in gts:
            hypothesis = res[key][0].replace("|||", "").replace("  ", " ")
            request = " ||| ".join(("SCORE", " ||| ".join(gts[key]), hypothesis))
            self.process.stdin.write(f"{request}\n".encode())
            self.process.stdin.flush()
            line += " ||| " + self.process.stdout.readline().decode().strip()
        self.process.stdin.write(f"{line}\n".encode())
        self.process.stdin.flush()
        for _ in gts:
            self.process.stdout.readline()
        return float(self.process.stdout.readline().strip())

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.kill()
            self.process.wait()
            self.process = None

