"""A Python stand-in for CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` on
Unicode text (the TimeChat-format YouCook2 evaluator tokenizes captions as they are; the
E.T. Bench evaluators replace non-ASCII characters first and use the ASCII lexer of
``ptb.py``).

Written from the program's observed behaviour (probed with the jar, see
``tools/crosscheck_timechat_scoring.py --tokenizer_only``), not from its source. It covers
what captions contain: words, numbers, hyphenated and slashed compounds, clitics
(``do n't``, ``it 's``, ``can not``, ``gon na``), abbreviations that keep their period
(``mr.``, ``etc.``, ``no.`` before a number, single letters, ``u.s.``), quotes, brackets
(``-lrb-``), ellipses, dashes, currency and fraction signs, e-mails and URLs, line breaks
(``\\r``, ``\\x0b``, ``\\x0c``, ``\\u2028``, ``\\u2029`` start a new line), separators
(Unicode spaces, zero-width and control characters) and characters it drops (outside the
Basic Multilingual Plane, soft hyphens). Rarer constructions may come out differently from
the jar; the scorers record which tokenizer ran, and the jar is used whenever available.

Only the tokens that survive coco-caption's punctuation filter matter to a score; where the
jar's exact punctuation token is irrelevant (every quote becomes one of ``` `` ```, ``''``,
`` ` ``, ``'``, all dropped) the simplest of them is produced.
"""

from __future__ import annotations

import re
import unicodedata

_LINE_BREAK = re.compile("\r\n|[\r\n\x0b\x0c\u2028\u2029]")
_SEPARATOR = re.compile("[^\\S\x85]+|[\u200b\u200c\u200d\u2060\ufeff\x00-\x1f\x7f-\x84\x86-\x9f]+")

# Words whose period stays attached (probed: the exact forms listed are kept).
_ABBREVIATIONS_ANY_CASE = frozenset("""
adm al ala apr ariz assn atty aug ave bhd bldg blvd brig bros calif capt cf cmdr co col colo
comdr conn corp cos cpl dak dec dept det dr drs esq est etc ext feb fla fri ft ga gen gov govs
hon inc ind intl jan jr jul jun kan kans ky lieut lt ltd m maj mar md messrs mich minn mlle mme
mo mon mont mr mrs ms mt neb nev nov oct okla penn pfc ph plc pres prof profs pvt rd rep reps
rev sen sens sep sept seq sgt spc sq sr st ste supt supts sys tel tenn thu thurs tue tues univ
va vs vt wed wis wisc wyo""".split())
_ABBREVIATIONS_CAPITALISED = frozenset("Ark Del Ill La Mass Miss Ore Pa Tex Wash".split())
_ABBREVIATIONS_BEFORE_NUMBER = frozenset("no nos prop art pp op ca fig figs".split())
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3}
_FRACTIONS = {"¼": "1/4", "½": "1/2", "¾": "3/4", "⅓": "1/3", "⅔": "2/3", "⅕": "1/5",
              "⅖": "2/5", "⅗": "3/5", "⅘": "4/5", "⅙": "1/6", "⅚": "5/6", "⅛": "1/8",
              "⅜": "3/8", "⅝": "5/8", "⅞": "7/8"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CURRENCY = {"€": "$", "£": "#", "¢": "cents"}
_QUOTES = "\"“”«»‹›‘’`"
_APOSTROPHES = "'’"

# Numeric characters that are not decimal digits (superscripts, circled numbers, fractions)
# are symbols to the jar, not parts of words.
_NON_DECIMAL_NUMERICS = "".join(chr(c) for c in range(0x80, 0x10000)
                                if unicodedata.category(chr(c)) in ("No", "Nl"))
_L = rf"[^\W\d_{_NON_DECIMAL_NUMERICS}]"  # a letter
_A = rf"[^\W_{_NON_DECIMAL_NUMERICS}]"     # a letter or decimal digit
_HYPHEN = "[-\u2010\u2011]"
_PATTERNS = [  # (name, pattern); the longest match wins, the first listed on ties
    ("sgml", r"</?[A-Za-z!?][^<>\r\n]*>"),
    ("url", r"(?:https?|www)[:.][^\s<>\"]+"),
    ("email", r"(?:mailto:)?[\w.+-]+@[\w-]+(?:\.[\w-]+)*"),
    ("emoticon", r"[:;]-?[()]|[:;]-?[pPdD](?![A-Za-z])"),
    ("fraction", r"(?:\d{1,4}[ \u00a0])?\d{1,4}/\d{1,4}|\d*[¼½¾⅓⅔⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞]"),
    ("slashed", rf"{_A}+(?:/{_A}+)+"),
    ("hyphenated", rf"{_A}[\w.,]*(?:{_HYPHEN}{_A}+)+"),
    ("number", r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)"),
    ("acronym", r"(?:[A-Za-z]\.)+"),
    ("abbreviation", rf"{_L}+\."),
    ("word", rf"{_L}{_A}*(?:[.!?]{_L}{_A}*)*"),
    ("alnum", rf"{_A}+"),
    ("underscored", rf"{_A}+(?:_+{_A}+)+"),
    ("letter_apostrophe", rf"[A-Za-z][{_APOSTROPHES}]{_L}{{2}}{_L}*"),
    ("clitic", rf"[{_APOSTROPHES}](?:[sSmMdD]|re|RE|ve|VE|ll|LL)(?!{_L})"),
    ("apostrophe_n", rf"[{_APOSTROPHES}]n[{_APOSTROPHES}]"),
    ("apostrophe_word", rf"[{_APOSTROPHES}](?:em|til|till|cause|\d0s)(?!{_L})"),
    ("tis", rf"'t(?=(?:is|was)(?!{_L}))"),
    ("ampersand", r"&(?:amp|lt|gt|quot);|&#\d+;|[A-Z]+&[A-Z]+|&"),
    ("dollar", r"[A-Z]*\$"),
    ("hashtag", r"#[A-Za-z]\w*|##+"),
    ("handle", r"@[A-Za-z_]\w*"),
    ("ellipsis", r"\.\.\.+|[…\x85]"),
    ("dashes", r"-{2,}|[—–―]"),
    ("marks", r"[?!]+|\*+"),
    ("other", r"."),
]
_COMPILED = [(name, re.compile(pattern)) for name, pattern in _PATTERNS]
_PERIOD_TAKERS = frozenset(("word", "alnum", "hyphenated", "number", "underscored", "slashed",
                            "letter_apostrophe"))
_NUMBER_AHEAD = re.compile(r"[ \u00a0]*\d")
_NEGATION_AHEAD = re.compile(rf"[{_APOSTROPHES}][tT](?!{_L})")


def tokenize_lines(text: str) -> list[str]:
    """The jar's output lines for ``text`` (one per input line, tokens space-joined)."""
    return [" ".join(tokenize_line(line)) for line in _LINE_BREAK.split(text)]


def _keeps_period(word: str, rest: str) -> bool:
    if rest[:1] in (",", ";", ":"):  # the jar keeps any period followed by one of these
        return True
    stem = word[:-1]
    if stem.lower() in _ABBREVIATIONS_ANY_CASE or stem in _ABBREVIATIONS_CAPITALISED:
        return True
    return stem.lower() in _ABBREVIATIONS_BEFORE_NUMBER and bool(_NUMBER_AHEAD.match(rest))


def _longest(line: str, pos: int) -> tuple[str, str]:
    best_name, best = "other", ""
    for name, pattern in _COMPILED:
        match = pattern.match(line, pos)
        if match and len(match.group()) > len(best):
            if name == "abbreviation" and not _keeps_period(match.group(), line[match.end():]):
                continue
            best_name, best = name, match.group()
    return best_name, best


def _tokens_of(name: str, text: str, rest: str) -> list[str]:
    """The output tokens for one lexed piece (``rest``: the text after it)."""
    if name in ("sgml", "fraction"):
        if name == "fraction" and text[-1] in _FRACTIONS:
            head = text[:-1]
            return [(head + "\u00a0" if head else "") + _FRACTIONS[text[-1]]]
        return [re.sub(r"[ \t]", "\u00a0", text)]
    if name == "emoticon":
        return [text[:-1] + _BRACKETS[text[-1]] if text[-1] in "()" else text]
    if name == "ampersand":
        return [{"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": "''"}.get(text, text)]
    if name == "ellipsis":
        return ["..."]
    if name == "dashes":
        return ["--"]
    if name in ("clitic", "tis"):
        return ["'" + text[1:]]
    if name == "letter_apostrophe":
        letter = text[0]
        if letter in "dlno" or (letter.isupper() and letter not in "IY") \
                or text.lower().startswith(("s'mores", "s’mores")):
            return [text[0] + "'" + text[2:]]
        if letter in "jyY":
            return [letter + "'", text[2:]]
        return [letter, "`", text[2:]]
    if len(text) == 1:
        if text in _BRACKETS:
            return [_BRACKETS[text]]
        if text in _CURRENCY:
            return [_CURRENCY[text]]
        if text in _QUOTES or text in _APOSTROPHES:
            return ["'"]
    return [text]


def tokenize_line(line: str) -> list[str]:
    """Lower-cased tokens of one line (punctuation tokens included, as the jar prints)."""
    line = "".join(" " if ord(c) > 0xFFFF else c for c in line if c != "\u00ad")
    tokens: list[str] = []
    pos = 0
    while pos < len(line):
        gap = _SEPARATOR.match(line, pos)
        if gap:
            pos = gap.end()
            continue
        name, text = _longest(line, pos)
        end = pos + len(text)
        rest = line[end:]
        if name in ("word", "alnum", "hyphenated") and _NEGATION_AHEAD.match(rest) \
                and text[-1] in "nN" and len(text) > 1 and text[-2] not in "nN":
            tokens += [text[:-1], "n't"]
            end += 2
        elif name == "word" and text.lower() in _SPLIT_WORDS:
            cut = _SPLIT_WORDS[text.lower()]
            tokens += [text[:cut], text[cut:]]
        else:
            if name in _PERIOD_TAKERS and rest[:1] == "." and rest[1:2] in (",", ";", ":"):
                text, end, rest = text + ".", end + 1, rest[1:]
            tokens += _tokens_of(name, text, rest)
        pos = end
    return [t.lower() for t in tokens if t]
