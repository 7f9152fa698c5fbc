"""Random messy answers and TimeChat-format prediction records (Charades-STA, YouCook2).

Answers mix what a grounded video LLM writes (``a - b`` intervals, ``</evi>`` stages,
captions) with what it writes when it goes wrong: no delimiter, several delimiters, no
number, reversed or out-of-range intervals, ``m:ss`` and ``h:mm:ss`` clock times, a lone
number, ``a to b``, "start time: x" phrases, runs of dots inside numbers, Unicode digits
and letters, emoji, huge numbers (also past float range), empty text. Every draw comes from
one ``random.Random`` so a seed reproduces a whole set.

The records follow the authors' inference layout (``idx``, ``task``, ``source``,
``video``, ``q``, ``tgt``, ``g``, ``a``); ``with_index`` adds the ``index`` field the
authors' Charades converter looks up on a failed answer.
"""

from __future__ import annotations

import random
from typing import Any

CAPTION_WORDS = ("add", "the", "chopped", "onions", "to", "pan", "stir", "well", "and",
                 "cook", "for", "minutes", "salt", "pepper", "mix", "eggs", "flour", "in",
                 "a", "bowl", "pour", "sauce", "over", "chicken", "slice", "tomatoes",
                 "garlic", "oil", "heat", "fry", "until", "golden", "serve", "with", "rice",
                 "boil", "water", "cut", "into", "pieces", "place", "on", "plate", "bake",
                 "person", "opens", "door", "walks", "holding", "cup", "sits", "chair")
_ODD_WORDS = ("stir-fry", "don't", "it's", "chef's", "(optional)", "[note]", "\"hot\"",
              "'fresh'", "1/2", "50%", "&", "café", "jalapeño", "naïve", "crème", "well-done",
              "e.g.", "etc.", "u.s.", "mr.", "a.", "oz.", "—", "–", "…", "½", "😀", "日本",
              "1,000", "3.5", "#1", "@home", "a/b", "x*y", "ok!", "why?", "wow!!", "...", "--",
              ";", ":", "St.", "Dr.", "No.", "AT&T", "o'clock", "can't", "cannot", "gonna")
_UNICODE_DIGITS = "٠١٢٣٤٥٦٧٨٩０１２３４５６７８９"
_SEPARATORS = (" - ", "-", " -", "- ", "  -  ", " – ", " to ")


def _number(rng: random.Random, duration: float = 120.0) -> str:
    kind = rng.random()
    if kind < 0.55:
        return f"{rng.uniform(0, duration):.1f}"
    if kind < 0.75:
        return str(rng.randint(0, int(duration)))
    if kind < 0.80:
        return f"{rng.uniform(0, duration):.{rng.randint(2, 6)}f}"
    if kind < 0.84:
        return f"{rng.randint(0, int(duration))}."
    if kind < 0.85:  # huge (repr 1e+17 ...), kept short: the authors' number patterns
        return str(rng.randint(10 ** 16, 10 ** 21))  # backtrack cubically on long digit runs
    if kind < 0.87:
        return str(rng.randint(0, 9))
    if kind < 0.8702:  # rare: the authors' number patterns backtrack cubically on it
        return "9" * rng.randint(310, 330)  # past float range: inf
    if kind < 0.91:
        return "".join(rng.choice(_UNICODE_DIGITS) for _ in range(rng.randint(1, 3)))
    if kind < 0.93:
        return f"{rng.randint(0, 99)}..{rng.randint(0, 9)}"
    if kind < 0.96:
        return f"0.0000{rng.randint(1, 9)}"
    return str(rng.randint(int(duration), int(3 * duration)))  # out of range


def _interval(rng: random.Random, duration: float = 120.0) -> str:
    a, b = _number(rng, duration), _number(rng, duration)
    return f"{a}{rng.choice(_SEPARATORS[:-1])}{b}"


def _clock(rng: random.Random, hours: bool = False) -> str:
    text = f"{rng.randint(0, 3)}:{rng.randint(0, 59):02d}"
    if hours:
        text = f"{rng.randint(0, 1):02d}:" + text.zfill(5)
    if rng.random() < 0.1:
        text = text.replace(":", ".5:", 1)
    return text


def caption(rng: random.Random, odd: float = 0.15) -> str:
    """A caption of 1-12 words, some of them odd (punctuation, Unicode, abbreviations)."""
    words = [rng.choice(_ODD_WORDS) if rng.random() < odd else rng.choice(CAPTION_WORDS)
             for _ in range(rng.randint(1, 12))]
    if rng.random() < 0.3:
        words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(("", ".", ".", ",", "!", " .", "..."))


def _noise(rng: random.Random) -> str:
    return rng.choice(("", "", " ", "\n", "ok", "😀", "the event", " seconds", "!", "?",
                       "Answer: ", "<evi>", "time", "…", "\t", "ünïcödé", "null", "[]"))


def _evidence_stage(rng: random.Random, duration: float) -> str:
    count = rng.choice((0, 1, 1, 1, 2, 2, 3, 5))
    parts = [_interval(rng, duration) for _ in range(count)]
    joiner = rng.choice((", ", ", ", " ", "; ", " and ", "\n"))
    return _noise(rng) + joiner.join(parts) + (_noise(rng) if rng.random() < 0.3 else "")


def _delimited(rng: random.Random, evidence: str, answer: str) -> str:
    kind = rng.random()
    if kind < 0.80:
        return f"{evidence}</evi>{answer}"
    if kind < 0.88:
        return answer  # no delimiter
    if kind < 0.94:
        return f"{evidence}</evi>{_noise(rng)}</evi>{answer}"
    return f"{evidence}</EVI>{answer}"


def grounding_answer(rng: random.Random, duration: float = 60.0) -> str:
    """A Charades-STA style answer (one event), messy."""
    a, b = _number(rng, duration), _number(rng, duration)
    kind = rng.random()
    if kind < 0.35:
        body = f"The event happens in {a}{rng.choice(_SEPARATORS[:-1])}{b} seconds."
    elif kind < 0.45:
        body = f"It happens from {a} to {b}."
    elif kind < 0.55:
        body = f"The event starts at {a}{rng.choice(('s', '', ' seconds'))}. It ends at {b}!"
    elif kind < 0.60:
        body = f"start time {_clock(rng, True)}\nend time {_clock(rng, True)}"
    elif kind < 0.65:
        body = f"At {_clock(rng)} the person {rng.choice(CAPTION_WORDS)}."
    elif kind < 0.72:
        body = f"The event happens at {a}."
    elif kind < 0.78:
        body = ", ".join(_interval(rng, duration) for _ in range(rng.randint(2, 4)))
    elif kind < 0.84:
        body = caption(rng, odd=0.4)
    elif kind < 0.88:
        body = ""
    else:
        body = f"{_noise(rng)}{a}{_noise(rng)}{rng.choice(_SEPARATORS)}{_noise(rng)}{b}"
    return _delimited(rng, _evidence_stage(rng, duration), body)


def _dense_line(rng: random.Random, duration: float) -> str:
    kind = rng.random()
    if kind < 0.55:
        return f"{_interval(rng, duration)}{rng.choice((' seconds', '', 's'))}, {caption(rng)}"
    if kind < 0.65:
        return f"{_number(rng, duration)} seconds, {caption(rng)}"
    if kind < 0.72:
        return f"{_clock(rng)} seconds, {caption(rng)}"
    if kind < 0.76:
        return f"{_clock(rng)} - {_clock(rng)} seconds, {caption(rng)}"
    if kind < 0.80:
        return (f"Start time: {_number(rng, duration)}s, End time: {_number(rng, duration)}s, "
                f"Description: {caption(rng)}")
    if kind < 0.83:
        return f"* {caption(rng)} start time: {_number(rng, duration)} end time: " \
               f"{_number(rng, duration)}"
    if kind < 0.84:
        return f"start time {_number(rng, duration)}, end time {_number(rng, duration)}"
    if kind < 0.90:
        return caption(rng, odd=0.3)
    return f"{_number(rng, duration)} {_number(rng, duration)} {_number(rng, duration)} " \
           f"seconds {caption(rng)}"


def dense_answer(rng: random.Random, duration: float = 200.0) -> str:
    """A YouCook2 style answer (several captioned events), messy."""
    lines = [_dense_line(rng, duration) for _ in range(rng.choice((0, 1, 2, 3, 4, 6, 9, 13)))]
    joiner = rng.choice(("\n", "\n", ". ", " ", "\n\n"))
    return _delimited(rng, _evidence_stage(rng, duration), joiner.join(lines))


def _gt_interval(rng: random.Random, duration: float) -> list[float]:
    start = round(rng.uniform(0, duration * 0.9), rng.choice((0, 1, 2)))
    end = round(min(duration, start + rng.uniform(0.5, duration / 3)), rng.choice((0, 1, 2)))
    if end <= start:
        end = start + 1
    if rng.random() < 0.5:
        return [int(start), int(end) + (int(end) <= int(start))]
    return [start, end]


def _ground_truth_caption(rng: random.Random) -> str:
    """A clean caption: no ". " inside and no trailing dot (the file joins them with ". ")."""
    text = caption(rng, odd=0.05).rstrip(".")
    while ". " in text:
        text = text.replace(". ", " ")
    return text.rstrip(".") or "mix"


def charades_records(rng: random.Random, count: int, with_index: float = 1.0,
                     start_idx: int = 0) -> list[dict[str, Any]]:
    """``count`` Charades-STA prediction records in the authors' layout."""
    records = []
    for n in range(count):
        idx = start_idx + n
        duration = rng.uniform(10, 60)
        query = " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(2, 8)))
        record = {"version": 1.0, "idx": idx, "task": "tvg", "source": "charades_sta",
                  "video": f"charades/compressed_videos/V{idx % 97:04d}.mp4",
                  "tgt": _gt_interval(rng, duration),
                  "q": f"You are given a video about indoor activities. Watch the video "
                       f"carefully and find a visual event described by the sentence: "
                       f"'{query}'. The format of your response should be: 'The event "
                       f"happens in <start time> - <end time>'.",
                  "a": grounding_answer(rng, duration)}
        if rng.random() < with_index:
            record["index"] = idx
        records.append(record)
    return records


def youcook2_records(rng: random.Random, count: int, start_idx: int = 0
                     ) -> list[dict[str, Any]]:
    """``count`` YouCook2 prediction records (one per video) in the authors' layout."""
    records = []
    for n in range(count):
        idx = start_idx + n
        duration = rng.uniform(60, 400)
        segments = sorted((_gt_interval(rng, duration) for _ in range(rng.randint(1, 8))),
                          key=lambda s: s[0])
        captions = [_ground_truth_caption(rng) for _ in segments]
        records.append({"version": 1.0, "idx": idx, "task": "dvc", "source": "youcook2",
                        "video": f"youcook2/compressed_videos/vid{idx:05d}.mp4",
                        "duration": duration, "tgt": segments, "g": captions,
                        "q": "You are given a video about 'making fattoush'. Watch the video "
                             "carefully and densly describe all the cooking steps.",
                        "a": dense_answer(rng, duration)})
    return records
