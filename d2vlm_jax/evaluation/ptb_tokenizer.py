"""coco-caption's caption tokenisation: Stanford PTBTokenizer (CoreNLP 3.4.1), punctuation dropped.

coco-caption (and the TimeChat / densevid dense-captioning evaluators built on it) joins
all captions of one call with newlines, runs ``java -cp stanford-corenlp-3.4.1.jar
edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` on that text, pairs the
output lines with the captions **by position**, and drops the tokens in
:data:`PUNCTUATIONS` from each line. Two consequences that a faithful scorer keeps:

* a caption holding a character the Java tokenizer treats as a line break (``\\r``,
  ``\\x0b``, ``\\x0c``, ``\\u2028``, ``\\u2029``) yields two output lines, and every
  later caption of the same call is paired with its predecessor's tokens;
* with ``-lowerCase`` the bracket tokens come out as ``-lrb-``, ``-rrb-``, ... which the
  upper-case :data:`PUNCTUATIONS` entries do not drop: they stay in the caption.

Two line tokenizers implement ``lines(text) -> list[str]`` (the Java program's output
split at ``\\n``):

* :class:`JavaPTBTokenizer`: the real program, given the user's
  ``stanford-corenlp-3.4.1.jar`` (``pip install pycocoevalcap`` brings one under
  ``pycocoevalcap/tokenizer/``) and Java. Exact by construction.
* :class:`PythonPTBTokenizer` (``ptb_python.py``): a re-implementation of the rules that
  caption text exercises, needing no Java; ``tools/crosscheck_timechat_scoring.py
  --tokenizer_only`` measures its agreement with the jar.

:func:`default_line_tokenizer` picks the Java one when a jar is given or found (an
installed ``pycocoevalcap``) and Java runs, else the Python one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                ":", "-", "--", "...", ";")
JAR_NAME = "stanford-corenlp-3.4.1.jar"


class LineTokenizer(Protocol):
    name: str

    def lines(self, text: str) -> list[str]:
        """The tokenizer's output for ``text`` (lines joined by ``\\n``), split at ``\\n``."""


class JavaPTBTokenizer:
    """Runs CoreNLP's PTBTokenizer from the user's jar, as coco-caption does."""

    def __init__(self, jar_path: str, java: str = "java"):
        if not os.path.isfile(jar_path):
            raise FileNotFoundError(f"PTBTokenizer jar not found: {jar_path}")
        self.jar_path = jar_path
        self.java = java
        self.name = f"java:{os.path.basename(jar_path)}"

    def lines(self, text: str) -> list[str]:
        command = [self.java, "-cp", self.jar_path, "edu.stanford.nlp.process.PTBTokenizer",
                   "-preserveLines", "-lowerCase"]
        handle, path = tempfile.mkstemp(suffix=".txt")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
            done = subprocess.run(command + [path], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, check=False)
        finally:
            os.remove(path)
        if done.returncode != 0:
            raise RuntimeError(f"PTBTokenizer ({self.jar_path}) failed: "
                               f"{done.stderr.decode('utf-8', 'replace')[-500:]}")
        return done.stdout.decode("utf-8").split("\n")


def find_jar(explicit: str | None = None) -> str | None:
    """``explicit``, else ``$D2VLM_PTB_JAR``, else an installed pycocoevalcap's jar, else None."""
    if explicit:
        return explicit
    if os.environ.get("D2VLM_PTB_JAR"):
        return os.environ["D2VLM_PTB_JAR"]
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, "tokenizer", JAR_NAME)
            if os.path.isfile(candidate):
                return candidate
    return None


def default_line_tokenizer(jar_path: str | None = None, java: str = "java") -> LineTokenizer:
    """Java PTBTokenizer when a jar is given or found and Java exists; else the Python one.

    A jar that was asked for explicitly but cannot be used raises; a jar found on its own
    that cannot be used falls back to the Python tokenizer with a warning.
    """
    from d2vlm_jax.evaluation.ptb_python import PythonPTBTokenizer

    jar = find_jar(jar_path)
    if jar is not None:
        if shutil.which(java) is None:
            if jar_path:
                raise FileNotFoundError(f"PTBTokenizer jar {jar} given but no {java!r} on PATH")
            logger.warning("found %s but no %r on PATH: using the Python PTB tokenizer", jar, java)
        elif os.path.isfile(jar):
            return JavaPTBTokenizer(jar, java)
        elif jar_path:
            raise FileNotFoundError(f"PTBTokenizer jar not found: {jar}")
    return PythonPTBTokenizer()


def make_line_tokenizer(kind: str = "auto", jar_path: str | None = None,
                        java: str = "java") -> LineTokenizer:
    """``"auto"`` (:func:`default_line_tokenizer`), ``"java"`` (needs a jar) or ``"python"``."""
    from d2vlm_jax.evaluation.ptb_python import PythonPTBTokenizer

    if kind == "python":
        return PythonPTBTokenizer()
    if kind == "java":
        jar = find_jar(jar_path)
        if jar is None:
            raise FileNotFoundError(f"tokenizer 'java' needs {JAR_NAME}: pass its path, set "
                                    "$D2VLM_PTB_JAR or pip install pycocoevalcap")
        return JavaPTBTokenizer(jar, java)
    if kind == "auto":
        return default_line_tokenizer(jar_path, java)
    raise ValueError(f"unknown tokenizer {kind!r}: auto, java or python")


def tokenize_captions(captions: Mapping[Hashable, Sequence[str]], tokenizer: LineTokenizer
                      ) -> dict[Hashable, list[str]]:
    """coco-caption's ``PTBTokenizer.tokenize`` on ``{key: [caption, ...]}``.

    Returns ``{key: [tokenized caption, ...]}`` paired by position with the tokenizer's
    output lines (see the module docstring: a caption with a Java line break shifts the
    later ones); a key whose captions got no output line is absent.
    """
    keys = [key for key, texts in captions.items() for _ in texts]
    text = "\n".join(t.replace("\n", " ") for texts in captions.values() for t in texts)
    out: dict[Hashable, list[str]] = {}
    for key, line in zip(keys, tokenizer.lines(text)):
        kept = [w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS]
        out.setdefault(key, []).append(" ".join(kept))
    return out
