#!/usr/bin/env python
"""Crosscheck the Python PTB tokenizer (``d2vlm_jax.evaluation.ptb``) against the jar.

The jar is coco-caption's ``stanford-corenlp-3.4.1.jar`` (``-preserveLines -lowerCase``),
as an installed ``pycocoevalcap`` ships it; Java must be on the PATH. Not part of CI.

* default: ``--lines N`` messy lines of each kind, all in one jar call per kind, compared
  line by line, raw (every token as the jar prints it) and after coco-caption's
  punctuation filter (what the caption metrics see):

  - ``etbench``: ground-truth and parsed captions and whole answers of random DVC/SLC
    records (``messy_records``), non-ASCII replaced by spaces as E.T. Bench's scorer does;
  - ``youcook2``: ground-truth captions and answer lines of random YouCook2 records and
    messy captions (``messy_timechat_records``), Unicode kept;
  - ``soup``: random strings over letters, digits, ASCII punctuation and common Unicode;
  - ``words``: random sequences of tricky tokens (abbreviations, clitics, quotes, URLs,
    SGML, emoticons, scripts, entities, ...).

* ``--all_characters``: every Basic Multilingual Plane character in a dozen contexts;
  prints the characters whose tokens differ (the jar's Unicode tables are older than
  Python's: see ``ptb._UNKNOWN_TO_THE_JAR``).
* ``--record FIXTURE``: re-records every case of ``tests/data/ptb_tokenizer_cases.json``
  with the jar (``tokens`` after the punctuation filter and the raw ``line``; ``lines`` for
  the multi-line cases) and adds ``--add N`` new random cases of each kind.

Example::

  python tools/crosscheck_ptb_tokenizer.py --lines 3000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import unicodedata

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from d2vlm_jax.evaluation import coco_caption, ptb  # noqa: E402
from d2vlm_jax.evaluation import messy_timechat_records as messy_timechat  # noqa: E402
from d2vlm_jax.evaluation.densevid import remove_nonascii  # noqa: E402
from d2vlm_jax.evaluation.etbench_answers import dense_captions  # noqa: E402
from d2vlm_jax.evaluation.messy_records import messy_records  # noqa: E402

_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\u2028\u2029"})
_SOUP = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789   "
         ".,;:!?'\"-()[]{}/&*#@$%<>+=_~^|\\`" "éüñçàÉ—–…½£€¥°·\u00a0\u3000😀日’‘“”«»\t\x85\xad\u200b")
_WORDS = (
    "e.g. U.S. etc. No. Mr. The A a. don't it's can't gonna cannot x-ray 3.5 1,000 10:00 1/2 ( ) "
    "\" ' </evi> <evi> ... -- - Co. Inc. St. vs. i.e. a.m. p.m. 5 12 Jan. seconds At He . , : ; ! "
    "? & AT&T e-mail @home #1 $5 50% :) ;-) 's n't o'clock rock'n'roll café naïve — – “hi” ‘ok’ ’ "
    "«x» ½ °C x² ™ © <a\u00a0b='c'> http://x.com/a www.foo.com foo@bar.com 555-1234 1.txt c++ ^_^ "
    "'90s y'all d'Alembert &amp; &quot; &lt; &mdash; S&P-500 pro- ¼ ¢ £ #hashtag @user x\u00ady "
    "O'Neil ’s n’t THE AN Mass. mass. Ph.D. Calif. Dept. ft. fig. art. pp. a.k.a. Mrs. Gov. Sen. "
    "Corp. Ltd. Jr. Wash. Pa. Ill. x. I. Q. b) (c) 1. 2) # $ US$ €5 ¥ 1st 21st-century co-op "
    "U.S.-based x_y __init__ a/b 1/2/2020 12-31-99 10:30am -5 +5 5- 1990s 'til 'tis 'twas ain't "
    "won't y’know Shi'ite j'ai l'avion qu'il aujourd'hui 'em o' O’ x’ ’x ‘ ‛ „ ‹x› <!--\u00a0c\u00a0--> "
    "<?xml\u00a0?> </a> <br/> <a/> <b\u00a0> <<x >> <3 :-( :P ;D =) :'( (^_^) -_- ツ 日本語 中文。 한국어 "
    "Ελληνικά русский עברית العربية हिन्दी ไทย \u200b \ufeff \u3000 … . ?! !!! *** \\* @@ ## __ = "
    "== + % ~ ^ | \\ ` `` '' &nbsp; &apos; &eacute; &#39; &HT; -LRB- -rrb- C.D.s anti- Cap'n c'est "
    "'n'").split(" ")


def filtered(line: str) -> str:
    """A tokenizer output line after coco-caption's punctuation filter."""
    return " ".join(t for t in line.rstrip().split(" ") if t not in coco_caption.PUNCTUATIONS)


def messy_lines(kind: str, count: int, rng: random.Random) -> list[str]:
    """``count`` or more one-line texts of ``kind`` (see the module docstring)."""
    lines: list[str] = []
    if kind == "etbench":
        while len(lines) < count:
            for record in messy_records(rng, per_task=50, tasks=("dvc", "slc")):
                parsed = dense_captions(record["a"])
                lines += record["g"] + (parsed[1] if parsed else []) + [record["a"]]
        lines = [remove_nonascii(text) for text in lines]
    elif kind == "youcook2":
        while len(lines) < count:
            for record in messy_timechat.youcook2_records(rng, 20):
                lines += record["g"] + record["a"].split("\n")
            lines += [messy_timechat.caption(rng, odd=0.4) for _ in range(100)]
    elif kind == "soup":
        lines = ["".join(rng.choice(_SOUP) for _ in range(rng.randint(0, 40))) for _ in range(count)]
    elif kind == "words":
        lines = ["".join(rng.choice(_WORDS) + rng.choice(("", " ", " ", "  ", "\t"))
                         for _ in range(rng.randint(1, 15))) for _ in range(count)]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return [text.translate(_LINE_BREAKS) for text in lines[:count]]


def compare(kind: str, lines: list[str], jar: str, show: int) -> tuple[int, int]:
    """Raw and filtered mismatches of ``lines`` (one text, one jar call); prints a few."""
    text = "\n".join(lines)
    theirs, ours = coco_caption._stanford_lines(text, jar), ptb.tokenize_lines(text)
    if len(theirs) != len(ours):
        print(f"{kind}: {len(theirs)} lines from the jar, {len(ours)} from ptb.py")
    raw = [i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
    after_filter = [i for i in raw if filtered(theirs[i]) != filtered(ours[i])]
    print(f"{kind:9s} {len(lines):6d} lines: {len(raw)} differ raw ({100 * len(raw) / len(lines):.3f} %), "
          f"{len(after_filter)} after the punctuation filter "
          f"({100 * len(after_filter) / len(lines):.3f} %)")
    for i in raw[:show]:
        print(f"    {lines[i]!r}\n      jar  {theirs[i]!r}\n      ours {ours[i]!r}")
    return len(raw), len(after_filter)


def all_characters(jar: str, show: int) -> int:
    """Every BMP character in a dozen contexts; returns the number of differing lines."""
    contexts = ("C", "aCa", "1C1", "aC", "Ca", "C C", "x.C", "'C", "CC", "U.S. C", "#C", "x@C")
    chars = [chr(c) for c in range(1, 0x10000) if not 0xD800 <= c < 0xE000 and c != 10]
    total, points = 0, set()
    for context in contexts:
        # (each line starts with a word naming its character: "q233q aéa")
        text = "\n".join(f"q{ord(c)}q " + context.replace("C", c) for c in chars)
        theirs, ours = coco_caption._stanford_lines(text, jar), ptb.tokenize_lines(text)
        bad = [i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
        bad += [min(len(theirs), len(ours))] if len(theirs) != len(ours) else []
        total += len(bad)
        print(f"context {context!r}: {len(bad)} of {len(theirs)} lines differ")
        for i in bad[:show]:
            print(f"    jar {theirs[i] if i < len(theirs) else None!r}  "
                  f"ours {ours[i] if i < len(ours) else None!r}")
        points.update(int(theirs[i].split(" ")[0][1:-1]) for i in bad
                      if i < len(theirs) and theirs[i].startswith("q"))
    for point in sorted(points):
        print(f"  U+{point:04X} {unicodedata.category(chr(point))} {unicodedata.name(chr(point), '?')}")
    return total


def record(path: str, jar: str, add: int, rng: random.Random) -> None:
    """Re-record every case of the fixture with the jar and add ``add`` cases per kind."""
    with open(path, encoding="utf-8") as f:
        cases = json.load(f)
    known = {case["text"] for case in cases}
    for kind, generated in (("caption", "youcook2"), ("etbench", "etbench"), ("soup", "soup"),
                            ("words", "words")):
        for text in messy_lines(generated, add, rng) if add else []:
            if text not in known:
                known.add(text)
                cases.append({"kind": kind, "text": text})
    single = [case for case in cases if case["kind"] != "multiline"]
    if any(text.translate(_LINE_BREAKS) != text for text in (case["text"] for case in single)):
        raise ValueError(f"{path}: a one-line case holds a line break (use kind 'multiline')")
    lines = coco_caption._stanford_lines("\n".join(case["text"] for case in single), jar)
    tokens = coco_caption.CaptionTokenizer("stanford", jar=jar).tokenize(
        {str(i): [{"caption": case["text"]}] for i, case in enumerate(single)})
    for i, case in enumerate(single):
        case["tokens"], case["line"] = tokens[str(i)][0], lines[i]
    for case in cases:
        if case["kind"] == "multiline":
            case["lines"] = coco_caption._stanford_lines(case["text"], jar)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=0)
    kinds = sorted({case["kind"] for case in cases})
    print(f"recorded {len(cases)} cases in {path}: "
          + ", ".join(f"{sum(c['kind'] == k for c in cases)} {k}" for k in kinds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=3000, help="messy lines of each kind")
    parser.add_argument("--kinds", default="etbench,youcook2,soup,words")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=5, help="differences printed per kind")
    parser.add_argument("--jar", help="stanford-corenlp-3.4.1.jar (default: pycocoevalcap's)")
    parser.add_argument("--all_characters", action="store_true")
    parser.add_argument("--record", metavar="FIXTURE")
    parser.add_argument("--add", type=int, default=0, help="with --record: new cases per kind")
    args = parser.parse_args(argv)
    jar = args.jar or coco_caption.stanford_jar()
    if jar is None:
        parser.error("no jar: install pycocoevalcap (and java) or pass --jar")
    rng = random.Random(args.seed)
    if args.record:
        record(args.record, jar, args.add, rng)
        return 0
    if args.all_characters:
        return 1 if all_characters(jar, args.show) else 0
    differing = 0
    for kind in args.kinds.split(","):
        differing += compare(kind, messy_lines(kind, args.lines, rng), jar, args.show)[0]
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
