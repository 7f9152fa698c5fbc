"""Random, messy E.T. Bench prediction records, for property tests and the crosscheck.

Answers mix what models really write and what breaks parsers: D²VLM's two-stage text
(``"12.0 - 15.5, 20.0 - 22.0</evi> answer"``), E.T. Chat / free text, empty answers,
unparseable text, reversed / zero-length / out-of-range / several intervals, ``a to b``,
keyword sentences ("starts at 12 and ends at 20"), ``m:ss`` and ``h:mm:ss`` clock times,
lone numbers (the ±20 s window), missing or repeated or upper-case delimiters, option
letters in every position and form (``(B)``, ``B.``, ``b)``, ``Best option: (C)``, ``(z)``,
a letter mid-sentence, option text only), unicode, huge numbers, "start time: x" /
"description:" layouts, ``*`` bullets, ellipses.

``crashers=True`` adds the inputs on which the authors' scripts stop with a Python error
(``"12.. - 15"``, ``"start time 5, end time 9"`` in a D²VLM caption answer, numbers that
overflow float32 in TAL, ...); without it the records avoid them, so that every script runs
to the end. Every record is valid input for the protocols (all fields the scripts read).
"""

from __future__ import annotations

import random
import re
from typing import Any

_CRASHING_NUMBER = re.compile(r"\d\.{2,}")  # "12.." : float() fails in the scripts

TASKS = ("rar", "eca", "rvq", "tvg", "epm", "tal", "evs", "vhd", "dvc", "slc", "tem", "gvq")
WORDS = ("a man", "the woman", "a dog", "someone", "the chef", "he", "she", "they", "people",
         "opens", "cuts", "the onion", "walks", "into the room", "picks up", "a cup", "slowly",
         "and", "then", "puts it down", "on the table", "is running", "laughs", "the door",
         "closes", "with a knife", "outside", "jumps", "plays guitar", "in the kitchen")
PUNCT = (".", ",", "!", "?", ";", ":", " -", " --", "...", "'s", "n't", " (yes)", " [x]",
         ' "quoted"', " & co", " e.g.", " 3.5", " 1,000", " x-ray", " can't", " it's")
UNICODE = ("é", "…", "–", "—", "“", "”", "日本", "ß", "\u00a0", "🙂")
CLOCK = ("0:30", "1:05", "01:30", "2:15", "10:00", "0:05:20", "1:02:03")


def _number(rng: random.Random, duration: float, crashers: bool) -> str:
    kind = rng.random()
    if kind < 0.45:
        return f"{rng.uniform(0, duration):.1f}"
    if kind < 0.65:
        return str(rng.randint(0, int(duration) + 5))
    if kind < 0.72:
        return f"{rng.uniform(0, duration):.{rng.randint(2, 4)}f}"
    if kind < 0.78:
        return f"{rng.randint(0, 60)}."  # trailing dot
    if kind < 0.82:
        return str(rng.randint(0, 3)) * rng.randint(1, 3)
    if kind < 0.86:
        return f"{rng.uniform(duration, 3 * duration + 10):.1f}"  # out of range
    if kind < 0.89:
        return "9" * rng.randint(12, 30)  # huge but finite in float32
    if kind < 0.91 and crashers:
        return rng.choice(["12..", "1..5", "9" * 40, "9" * 320])
    return f"{rng.randint(0, 9)}.{rng.randint(0, 9)}"


def _interval(rng, duration, crashers) -> str:
    a, b = _number(rng, duration, crashers), _number(rng, duration, crashers)
    if rng.random() < 0.08:
        b = a  # zero length
    sep = rng.choice([" - ", " - ", "-", " -", "- ", "  -  ", " to ", " – "])
    return f"{a}{sep}{b}"


def _filler(rng, n=None) -> str:
    words = [rng.choice(WORDS) for _ in range(n if n is not None else rng.randint(1, 6))]
    text = " ".join(words)
    if rng.random() < 0.3:
        text += rng.choice(PUNCT)
    if rng.random() < 0.1:
        text += " " + rng.choice(UNICODE)
    return text


def _grounding_stage(rng, duration, crashers) -> str:
    kind = rng.random()
    if kind < 0.1:
        return ""
    if kind < 0.15:
        return rng.choice(["<evi>", "none", "frames", "  "])
    parts = [_interval(rng, duration, crashers) for _ in range(rng.randint(1, 3))]
    return rng.choice([", ", " ", ",", "; "]).join(parts)


def _answer_text(rng, duration, crashers) -> str:
    """Free answer text for the grounding tasks."""
    kind = rng.random()
    if kind < 0.04:
        return ""
    if kind < 0.08:
        return _filler(rng)
    if kind < 0.45:
        intervals = [_interval(rng, duration, crashers) for _ in range(rng.randint(1, 3))]
        glue = rng.choice([", ", " and ", " seconds, ", ". ", "\n"])
        template = rng.choice(["{}", "The event happens at {}.", "{} seconds.", "From {}",
                               "It occurs during {} seconds", "{} .", "Answer: {}"])
        return template.format(glue.join(intervals))
    if kind < 0.6:
        a, b = _number(rng, duration, crashers), _number(rng, duration, crashers)
        template = rng.choice(["The event starts at {} and ends at {}.",
                               "start time {}\nend time {}", "It starts at {} seconds! It ends at {}",
                               "starts {} ends {}", "It happens in {} and then {}",
                               "start: {} seconds", "begins at {} finishes at {}"])
        return template.format(a, b)
    if kind < 0.7:
        return rng.choice([f"at {rng.choice(CLOCK)}", f"starts at {rng.choice(CLOCK)} ends at "
                           f"{rng.choice(CLOCK)}", f"{rng.choice(CLOCK)} - {rng.choice(CLOCK)}",
                           f"the start is {rng.choice(CLOCK)}"])
    if kind < 0.8:
        return rng.choice([f"around {_number(rng, duration, crashers)} seconds",
                           f"{_number(rng, duration, crashers)}",
                           f"+{rng.randint(0, 50)}", f"-{rng.randint(0, 50)}",
                           f"at {_number(rng, duration, crashers)} and {_number(rng, duration, crashers)}"])
    return f"{_filler(rng)} {_interval(rng, duration, crashers)} {_filler(rng)}"


def _with_delimiter(rng, grounding: str, answer: str) -> str:
    kind = rng.random()
    if kind < 0.62:
        return f"{grounding}</evi>{rng.choice(['', ' ', '  '])}{answer}"
    if kind < 0.72:
        return answer  # no delimiter (E.T. Chat-style)
    if kind < 0.78:
        return f"{grounding}</evi>{answer}</evi>{_filler(rng)}"
    if kind < 0.82:
        return f"{grounding}</EVI> {answer}"
    if kind < 0.86:
        return f"{grounding}</evi>"
    if kind < 0.9:
        return f"</evi>{answer}"
    return f"{grounding} {answer}"


def _letter_answer(rng, options: list, crashers) -> str:
    letters = "ABCDE"[:len(options)]
    letter = rng.choice(letters + "aZxe")
    option = rng.choice(options)
    option = f"{option[0]} - {option[1]}" if isinstance(option, list) else option
    return rng.choice([
        f"({letter})", f"({letter}) {option}", f"{letter}.", f"{letter}", f"{letter.lower()})",
        f"Best option: ({letter})", f"best option: {letter}", f"{letter}, {option}",
        f"The answer is ({letter}).", f"I think {letter} is right", f"{option}",
        f"  ( {letter} ) {option}", f"{letter}:{option}", "",
        f"({letter.lower()}) and ({rng.choice(letters)})",
        f"{_filler(rng)}", f"{letter} {option}", f"Option {letter}", f"({letter}", f"{letter}{option}",
    ])


def _options(rng, task, duration, first: bool) -> list:
    count = rng.choice([4, 5]) if task != "rvq" or first else rng.choice([4, 5, 5])
    if task in ("rar", "eca", "gvq") and rng.random() < 0.3:
        out = []
        for _ in range(count):
            s = round(rng.uniform(0, duration), 1)
            out.append([s, round(s + rng.uniform(0, 20), 1)])
        return out
    return [_filler(rng, rng.randint(1, 3)) for _ in range(count)]


def _gt_interval(rng, duration, zero_ok=True) -> list:
    s = round(rng.uniform(0, duration * 0.9), 1)
    e = round(min(duration, s + rng.uniform(0, duration / 2)), 1)
    if rng.random() < 0.1:
        s, e = float(int(s)), float(int(e) + 1)
    if e <= s and not zero_ok:
        e = s + 1.0
    if rng.random() < 0.05 and zero_ok:
        e = s
    return [s, e]


def _caption(rng) -> str:
    text = _filler(rng, rng.randint(2, 7))
    if rng.random() < 0.15:
        text = text.capitalize()
    return text


def _dense_answer(rng, duration, crashers) -> str:
    events = rng.randint(0, 4)
    kind = rng.random()
    pieces = []
    for _ in range(events):
        caption = _caption(rng)
        interval = _interval(rng, duration, crashers)
        if kind < 0.45:
            pieces.append(f"{interval} seconds, {caption}.")
        elif kind < 0.6:
            pieces.append(f"{caption} at {interval}.")
        elif kind < 0.68:
            pieces.append(f"start time: {_number(rng, duration, crashers)} seconds end time: "
                          f"{_number(rng, duration, crashers)} seconds description: {caption}\n")
        elif kind < 0.74:
            pieces.append(f"* {caption} ({interval})\n")
        elif kind < 0.82:
            pieces.append(f"{rng.choice(CLOCK)} {caption}.\n")
        elif kind < 0.88:
            pieces.append(f"At {_number(rng, duration, crashers)} seconds {caption}.")
        else:
            pieces.append(f"{interval}: {caption}...")
    text = rng.choice([" ", "\n", "", "  "]).join(pieces)
    if crashers and rng.random() < 0.2:
        text += f" start time {rng.randint(0, 9)}, end time {rng.randint(10, 20)} {_caption(rng)}"
    if rng.random() < 0.1:
        text = _filler(rng) + " " + text
    return text


def messy_record(rng: random.Random, task: str, index: int, source: str, *,
                 first_of_source: bool = False, crashers: bool = False,
                 videos: list | None = None) -> dict[str, Any]:
    """One record of ``task`` with a random messy answer ``a``."""
    duration = round(rng.uniform(10, 300), 1)
    record: dict[str, Any] = {"idx": index, "task": task, "source": source,
                              "video": f"{source}/v{rng.randint(0, 10 ** 6)}.mp4", "duration": duration}
    if videos is not None and videos and rng.random() < 0.15:
        record["video"] = rng.choice(videos)  # two samples of one video
    grounding = _grounding_stage(rng, duration, crashers)
    if task in ("tvg", "epm"):
        record["tgt"] = _gt_interval(rng, duration, zero_ok=True)
        answer = _answer_text(rng, duration, crashers)
    elif task in ("tem", "tal", "evs"):
        count = rng.randint(1, 3) if task != "evs" else rng.randint(0, 3)
        record["tgt"] = [_gt_interval(rng, duration, zero_ok=(task != "tal" or crashers))
                         for _ in range(count)]
        answer = _answer_text(rng, duration, crashers and task != "tal")
    elif task == "vhd":
        spans = [_gt_interval(rng, duration) for _ in range(rng.randint(1, 4))]
        record["tgt"] = spans if rng.random() < 0.5 else [spans, [_gt_interval(rng, duration)]]
        answer = _answer_text(rng, duration, crashers)
    elif task in ("dvc", "slc"):
        count = rng.randint(1, 4)
        record["tgt"] = [_gt_interval(rng, duration, zero_ok=False) for _ in range(count)]
        record["g"] = [_caption(rng) for _ in range(count)]
        answer = _dense_answer(rng, duration, crashers)
    else:  # rar, eca, rvq, gvq
        record["o"] = _options(rng, task, duration, first_of_source)
        record["p"] = rng.randrange(len(record["o"]))
        if task == "gvq":
            record["tgt"] = _gt_interval(rng, duration)
            answer = f"{_letter_answer(rng, record['o'], crashers)} {_answer_text(rng, duration, crashers)}"
        else:
            answer = _letter_answer(rng, record["o"], crashers)
    record["a"] = _with_delimiter(rng, grounding, answer)
    if rng.random() < 0.03:
        record["a"] = record["a"].upper()
    if not crashers:
        # "12.." (a number with 2+ dots) is a float() error in the scripts' parsers
        record["a"] = _CRASHING_NUMBER.sub(lambda m: m.group(0)[:2] + " ", record["a"])
    return record


def messy_records(rng: random.Random, per_task: int = 50, tasks=TASKS, sources: int = 2,
                  crashers: bool = False) -> list[dict[str, Any]]:
    """``per_task`` records of every task, spread over ``sources`` sources, shuffled."""
    records = []
    index = 0
    for task in tasks:
        videos: list = []
        seen: set = set()
        for k in range(per_task):
            source = f"{task}_source{k % sources}"
            record = messy_record(rng, task, index, source, first_of_source=source not in seen,
                                  crashers=crashers, videos=videos)
            seen.add(source)
            videos.append(record["video"])
            records.append(record)
            index += 1
    # shuffle, but keep each source's first record first (it decides RVQ's letter set)
    first = {}
    for r in records:
        first.setdefault((r["task"], r["source"]), r)
    rest = [r for r in records if first[(r["task"], r["source"])] is not r]
    rng.shuffle(rest)
    return list(first.values()) + rest
