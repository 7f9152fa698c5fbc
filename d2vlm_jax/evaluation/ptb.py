"""A Python PTB tokenizer for coco-caption's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1,
``-preserveLines -lowerCase``), without Java.

What it reproduces (checked against the jar by ``tools/crosscheck_authors_scoring.py``):
lines break at ``\\n``, ``\\r\\n``, ``\\r``, ``\\x0b``, ``\\x0c``; tokens are lower-cased;
brackets become ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-``; double quotes become ````` /
``''`` (opening after whitespace or at a line start, closing otherwise); clitics split off
(``n't 's 're 've 'll 'd 'm``, ``cannot -> can not``, ``gonna -> gon na``); numbers keep
their inner ``,`` and ``.``; ``...`` and ``--`` are one token; other punctuation is one
token per character. The Stanford lexer has many more rules (abbreviations, sentence-final
periods after them, URLs, emoticons, ...): text that needs them may tokenize differently,
and then the caption metrics differ from the toolkit's -- use the ``stanford`` back end
(``pycocoevalcap`` + java) for exact numbers on such text.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(r"\r\n|[\n\r\x0b\x0c\x85\u2028\u2029]")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_TOKEN = re.compile(
    r"""(?P<number>\d+(?:[.,]\d+)*)
      | (?P<word>[A-Za-z0-9]+(?:[-'&.][A-Za-z0-9]+)*)
      | (?P<ellipsis>\.\.\.)
      | (?P<dashes>--)
      | (?P<quote>")
      | (?P<clitic>'(?:s|re|ve|ll|d|m)\b|n't\b)
      | (?P<other>\S)""", re.VERBOSE | re.IGNORECASE)
_NT = re.compile(r"^(.+?)(n't)$", re.IGNORECASE)
_CLITIC_END = re.compile(r"^(.+?)('(?:s|re|ve|ll|d|m))$", re.IGNORECASE)


def _split_word(word: str) -> list[str]:
    lower = word.lower()
    if lower in _SPLIT_WORDS:
        a, b = _SPLIT_WORDS[lower]
        return [word[:len(a)], word[len(a):]]
    m = _NT.match(word)
    if m:
        return [m.group(1), m.group(2)]
    m = _CLITIC_END.match(word)
    if m:
        return [m.group(1), m.group(2)]
    return [word]


def _tokenize_line(line: str) -> str:
    tokens: list[str] = []
    previous_end = 0
    for match in _TOKEN.finditer(line):
        kind, text = match.lastgroup, match.group(0)
        if kind == "word":
            tokens.extend(_split_word(text))
        elif kind == "quote":
            opening = match.start() == 0 or line[match.start() - 1].isspace()
            tokens.append("``" if opening else "''")
        elif kind == "other" and text in _BRACKETS:
            tokens.append(_BRACKETS[text])
        else:
            tokens.append(text)
        previous_end = match.end()
    del previous_end
    return " ".join(t.lower() for t in tokens)


def tokenize_lines(text: str) -> list[str]:
    """Tokenized lines of ``text`` (one output line per input line), tokens space-joined."""
    return [_tokenize_line(line) for line in _LINE_BREAK.split(text)]
