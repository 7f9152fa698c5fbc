"""Factorized preference synthesis (SPEC §4.3): rejected responses that perturb ONE factor of
ONE sub-video event of the ground truth.

Events and their text spans
---------------------------
An *event* ``k`` is the k-th interval of ``Sample.events`` together with the k-th ``<evi>`` of
the answer and its **text span**. The answer is cut into spans and gaps::

    answer = gap_0 + span_0 + gap_1 + span_1 + ... + span_{K-1} + gap_K

with exactly one ``<evi>`` per span (span ``k`` holds the k-th ``<evi>``):

1. The answer is split into *sentences*: a sentence ends after a run of ``.``, ``!`` or ``?``
   that is followed by whitespace or the end of the text; the whitespace between sentences
   belongs to the gaps. A sentence holding exactly one ``<evi>`` is that event's span
   (``"The red circle appears at <evi>."``, ``"<evi> a red circle appears."``); sentences
   without ``<evi>`` stay in the gaps.
2. A sentence holding several ``<evi>`` is cut between each pair of consecutive ``<evi>``: after
   the last ``,`` or ``;`` between them if there is one (``"<evi> a cat sits, <evi> it
   leaves."`` -> ``"<evi> a cat sits,"`` + ``"<evi> it leaves."``), else right after the
   earlier ``<evi>`` (``"it opens at <evi> and closes at <evi>."`` -> ``"it opens at <evi>"``
   + ``"and closes at <evi>."``). Whitespace at the cut goes to the gap.

Families (``Rejected.family``; ``Rejected.event_index`` = the perturbed event's index)
--------------------------------------------------------------------------------------
Temporal (answer text unchanged, only intervals change):

* ``temporal_shift``: event k's interval moves by ``±d`` seconds, length kept;
  ``d ∈ [max(c, L/2), max(c, 3L/2)]`` (``L`` = its length, ``c`` = ``min_change_s``); the
  other direction is tried when one leaves ``[0, duration]``.
* ``temporal_stretch``: event k's interval is stretched (length × [1.5, 3], at least
  ``+2c``) or shrunk (length × [0.2, 0.6], at least ``-2c``) about its centre, clipped to the
  video.
* ``temporal_swap``: events k and j ≠ k exchange intervals (``event_index = min(k, j)``, the
  first event whose interval changes).

Textual:

* ``text_replace``: span k is replaced by another event's span (its ``<evi>`` included): a
  different span of the same answer or a span of another sample of the same task (coin flip
  when both exist; a span of another task only when neither exists); event k's interval is
  kept.
* ``text_delete``: span k, its ``<evi>`` and its interval are removed (with one neighbouring
  whitespace gap); not applied when nothing of the answer would remain.
* ``text_repeat``: span k is written twice (``span_k + " " + span_k``), the interval
  duplicated (the copy is event k + 1 of the rejected response).
* ``text_insert``: a fabricated event, i.e. the span and interval of an event of another
  sample (same task preferred), is inserted before span k (``k = K``: after the last span);
  ``event_index`` is the inserted event's index. The donor interval is moved to fit into
  ``[0, duration]`` (its length kept, capped by the duration).

Validity and determinism
------------------------
Timestamps are rounded to milliseconds and stay inside ``[0, duration]`` with
``start <= end``. A temporal perturbation must change the *frame* interval the model sees
(``seconds_to_frame_interval`` at ``frame_rate`` fps, up to ``max_frames`` frames, as in
``video.decode_video``); a result identical to the chosen response (same answer and same frame
intervals) or to an earlier rejected response of the sample is retried with fresh randomness
up to ``max_tries`` times, then dropped and counted (``PreferenceCounts.dropped``). All
randomness of sample ``i`` comes from ``numpy.random.default_rng([seed, i])``: the output for
one sample does not depend on the other samples' draws, and the same seed gives the same file.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
from collections.abc import Sequence

import numpy as np

from d2vlm_jax.data.schema import EVIDENCE_TOKEN, Rejected, Sample
from d2vlm_jax.data.video import seconds_to_frame_interval

logger = logging.getLogger(__name__)

TEMPORAL_FAMILIES = ("temporal_shift", "temporal_stretch", "temporal_swap")
TEXTUAL_FAMILIES = ("text_replace", "text_delete", "text_repeat", "text_insert")
ALL_FAMILIES = TEMPORAL_FAMILIES + TEXTUAL_FAMILIES

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_CLAUSE_BREAK = re.compile(r"[,;]")

Interval = tuple[float, float]


class PreferenceError(ValueError):
    """Bad arguments to the preference synthesis (unknown family, per_sample < 1, ...)."""


@dataclasses.dataclass(frozen=True)
class EventSpans:
    """An answer cut into ``gaps[0] + spans[0] + gaps[1] + ... + spans[K-1] + gaps[K]``.

    Attributes:
      spans: K strings, span k holds exactly one ``<evi>`` (event k's).
      gaps: K + 1 strings (whitespace, sentences without events).
    """
    spans: tuple[str, ...]
    gaps: tuple[str, ...]

    def join(self) -> str:
        return "".join(g + s for g, s in zip(self.gaps, self.spans + ("",), strict=True))


def _cut(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrinks ``text[start:end]`` to exclude leading/trailing whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_event_spans(answer: str) -> EventSpans:
    """Cuts an answer into event text spans and gaps (rules in the module docstring).

    ``split_event_spans(a).join() == a`` always holds.
    """
    bounds: list[tuple[int, int]] = []   # [start, end) of each span, in order
    sentence_start = 0
    sentence_ends = [m.end() for m in _SENTENCE_END.finditer(answer)]
    if not sentence_ends or sentence_ends[-1] < len(answer):
        sentence_ends.append(len(answer))
    for sentence_end in sentence_ends:
        s0, s1 = _cut(answer, sentence_start, sentence_end)
        sentence_start = sentence_end
        evis = [m.start() for m in re.finditer(re.escape(EVIDENCE_TOKEN), answer[s0:s1])]
        evis = [s0 + e for e in evis]
        if not evis:
            continue
        piece_start = s0
        for a, b in zip(evis[:-1], evis[1:]):
            after_a = a + len(EVIDENCE_TOKEN)
            breaks = [m.end() for m in _CLAUSE_BREAK.finditer(answer, after_a, b)]
            cut_at = breaks[-1] if breaks else after_a
            bounds.append(_cut(answer, piece_start, cut_at))
            piece_start = cut_at
        bounds.append(_cut(answer, piece_start, s1))
    spans = tuple(answer[a:b] for a, b in bounds)
    gaps, previous = [], 0
    for a, b in bounds:
        gaps.append(answer[previous:a])
        previous = b
    gaps.append(answer[previous:])
    assert all(s.count(EVIDENCE_TOKEN) == 1 for s in spans), spans
    return EventSpans(spans=spans, gaps=tuple(gaps))


@dataclasses.dataclass
class PreferenceCounts:
    """What :func:`make_preference_samples` produced.

    Attributes:
      made: rejected responses written, per family.
      retried: attempts redrawn because the result equalled the chosen (or an earlier
        rejected) response or left the video, per family.
      dropped: perturbations given up after ``max_tries`` attempts, per family.
      not_applicable: (sample, event, family) triples where the family cannot apply (a
        swap with one event, a deletion that would empty the answer, ...), per family.
      samples_in: samples read.
      samples_out: samples written (those with at least one rejected response).
      samples_without_events: samples skipped because they have no event to perturb.
      samples_short: samples written with fewer than ``per_sample`` rejected responses.
    """
    made: dict[str, int] = dataclasses.field(default_factory=lambda: collections.Counter())
    retried: dict[str, int] = dataclasses.field(default_factory=lambda: collections.Counter())
    dropped: dict[str, int] = dataclasses.field(default_factory=lambda: collections.Counter())
    not_applicable: dict[str, int] = dataclasses.field(default_factory=lambda: collections.Counter())
    samples_in: int = 0
    samples_out: int = 0
    samples_without_events: int = 0
    samples_short: int = 0

    def summary(self, families: Sequence[str] = ALL_FAMILIES) -> str:
        """A table, one line per family, then the sample totals."""
        lines = [f"{'family':<18}{'made':>8}{'retried':>9}{'dropped':>9}{'n/a':>8}"]
        for family in families:
            lines.append(f"{family:<18}{self.made.get(family, 0):>8}{self.retried.get(family, 0):>9}"
                         f"{self.dropped.get(family, 0):>9}{self.not_applicable.get(family, 0):>8}")
        lines.append(f"samples: {self.samples_in} in, {self.samples_out} out, "
                     f"{self.samples_without_events} without events, {self.samples_short} with fewer "
                     f"rejected than asked")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Donor:
    """An event span with its interval, available to other samples (replace / insert)."""
    sample_index: int
    task: str
    span: str
    interval: Interval


class _NotApplicable(Exception):
    """The family cannot apply to this sample (not a retryable failure)."""


def _round(t: float) -> float:
    return round(float(t), 3)


def _clip_interval(start: float, end: float, duration: float) -> Interval:
    start, end = min(max(start, 0.0), duration), min(max(end, 0.0), duration)
    start, end = _round(min(start, end)), _round(max(start, end))
    return min(start, duration), min(end, duration)


def _place(length: float, start: float, duration: float) -> Interval:
    """An interval of ``length`` (capped by the duration) starting near ``start``, inside."""
    length = min(length, duration)
    start = min(max(start, 0.0), duration - length)
    return _clip_interval(start, start + length, duration)


@dataclasses.dataclass(frozen=True)
class _Synth:
    """Perturbation settings shared by every sample."""
    min_change_s: float
    frame_rate: float
    max_frames: int | None

    def frame_times(self, duration: float) -> np.ndarray:
        count = max(1, math.ceil(duration * self.frame_rate - 1e-6))
        indices = np.arange(count)
        if self.max_frames is not None and count > self.max_frames:
            indices = np.round(np.linspace(0, count - 1, self.max_frames)).astype(np.int64)
        return (indices / self.frame_rate).astype(np.float32)

    # -------------------------------------------------------------- temporal

    def shift(self, sample: Sample, k: int, rng: np.random.Generator) -> Rejected:
        start, end = sample.events[k]
        length, c, duration = end - start, self.min_change_s, sample.duration
        if length + c > duration:
            raise _NotApplicable(f"event {k} spans the video: no room to shift it by {c} s")
        magnitude = rng.uniform(max(c, 0.5 * length), max(c, 1.5 * length))
        directions = [1.0, -1.0] if rng.random() < 0.5 else [-1.0, 1.0]
        for direction in directions:
            new_start = start + direction * magnitude
            if 0.0 <= new_start and new_start + length <= duration:
                break
        else:  # neither direction fits: shift as far as the video allows, at least c
            room_right, room_left = duration - end, start
            direction = 1.0 if room_right >= room_left else -1.0
            new_start = start + direction * max(room_right, room_left)
        return self._with_interval(sample, k, _clip_interval(new_start, new_start + length, duration),
                                   "temporal_shift")

    def stretch(self, sample: Sample, k: int, rng: np.random.Generator) -> Rejected:
        start, end = sample.events[k]
        length, c, duration = end - start, self.min_change_s, sample.duration
        centre = 0.5 * (start + end)
        can_shrink = length >= 2 * c
        can_stretch = length + c <= duration
        if not (can_shrink or can_stretch):
            raise _NotApplicable(f"event {k} can be neither stretched nor shrunk by {c} s")
        shrink = can_shrink and (not can_stretch or rng.random() < 0.5)
        if shrink:
            new_length = min(length * rng.uniform(0.2, 0.6), length - 2 * c)
        else:
            new_length = max(length * rng.uniform(1.5, 3.0), length + 2 * c)
        interval = _place(new_length, centre - 0.5 * new_length, duration)
        return self._with_interval(sample, k, interval, "temporal_stretch")

    def swap(self, sample: Sample, k: int, rng: np.random.Generator) -> Rejected:
        others = [j for j in range(len(sample.events)) if j != k and sample.events[j] != sample.events[k]]
        if not others:
            raise _NotApplicable("needs another event with a different interval")
        j = int(others[rng.integers(len(others))])
        events = list(sample.events)
        events[k], events[j] = events[j], events[k]
        return Rejected(answer=sample.answer, events=tuple(events), family="temporal_swap",
                        event_index=min(k, j))

    def _with_interval(self, sample: Sample, k: int, interval: Interval, family: str) -> Rejected:
        events = list(sample.events)
        events[k] = interval
        return Rejected(answer=sample.answer, events=tuple(events), family=family, event_index=k)

    # -------------------------------------------------------------- textual

    def replace(self, sample: Sample, k: int, rng: np.random.Generator, spans: EventSpans,
                donors: _DonorPool, sample_index: int) -> Rejected:
        own = [s for j, s in enumerate(spans.spans) if j != k and s != spans.spans[k]]
        donor = donors.draw(rng, sample.task, exclude_sample=sample_index, exclude_span=spans.spans[k],
                            any_task=False)
        if own and (donor is None or rng.random() < 0.5):
            new_span = own[rng.integers(len(own))]
        else:
            donor = donor or donors.draw(rng, sample.task, exclude_sample=sample_index,
                                         exclude_span=spans.spans[k], any_task=True)
            if donor is None:
                raise _NotApplicable("no other event text to replace with")
            new_span = donor.span
        new_spans = list(spans.spans)
        new_spans[k] = new_span
        answer = EventSpans(spans=tuple(new_spans), gaps=spans.gaps).join()
        return Rejected(answer=answer, events=sample.events, family="text_replace", event_index=k)

    def delete(self, sample: Sample, k: int, spans: EventSpans) -> Rejected:
        num_events = len(spans.spans)
        before, after = spans.gaps[k], spans.gaps[k + 1]
        left, right = before.rstrip(), after.lstrip()
        text_left = k > 0 or left != ""
        text_right = k + 1 < num_events or right != ""
        # One whitespace separator survives between the texts on both sides (the original one).
        separator = (before[len(left):] or after[:len(after) - len(right)] or " ") if (text_left and text_right) else ""
        gaps = spans.gaps[:k] + (left + separator + right,) + spans.gaps[k + 2:]
        answer = EventSpans(spans=spans.spans[:k] + spans.spans[k + 1:], gaps=gaps).join()
        if not answer.strip():
            raise _NotApplicable("deleting the only event would leave an empty answer")
        events = sample.events[:k] + sample.events[k + 1:]
        return Rejected(answer=answer, events=events, family="text_delete", event_index=k)

    def repeat(self, sample: Sample, k: int, spans: EventSpans) -> Rejected:
        # g_0 s_0 ... g_k s_k " " s_k g_{k+1} ...
        new_spans = spans.spans[:k + 1] + spans.spans[k:]
        gaps = spans.gaps[:k + 1] + (" ",) + spans.gaps[k + 1:]
        answer = EventSpans(spans=new_spans, gaps=gaps).join()
        events = sample.events[:k + 1] + sample.events[k:]
        return Rejected(answer=answer, events=events, family="text_repeat", event_index=k)

    def insert(self, sample: Sample, k: int, rng: np.random.Generator, spans: EventSpans,
               donors: _DonorPool, sample_index: int) -> Rejected:
        donor = donors.draw(rng, sample.task, exclude_sample=sample_index, exclude_span=None)
        if donor is None:
            raise _NotApplicable("no event of another sample to insert")
        d_start, d_end = donor.interval
        interval = (_clip_interval(d_start, d_end, sample.duration) if d_end <= sample.duration
                    else _place(d_end - d_start, rng.uniform(0.0, sample.duration), sample.duration))
        new_spans = spans.spans[:k] + (donor.span,) + spans.spans[k:]
        if k < len(spans.spans):   # g_0 s_0 ... g_k D " " s_k g_{k+1} ...
            gaps = spans.gaps[:k + 1] + (" ",) + spans.gaps[k + 1:]
        else:                      # ... s_{K-1} " " D g_K
            gaps = spans.gaps[:k] + (" ",) + spans.gaps[k:]
        answer = EventSpans(spans=new_spans, gaps=gaps).join()
        events = sample.events[:k] + (interval,) + sample.events[k:]
        return Rejected(answer=answer, events=events, family="text_insert", event_index=k)

    # -------------------------------------------------------------- checks

    def frame_signature(self, answer: str, events: Sequence[Interval], duration: float
                        ) -> tuple[str, tuple[tuple[int, int], ...]]:
        """What the model sees of a response: its text and its frame intervals."""
        times = self.frame_times(duration)
        return answer, tuple(seconds_to_frame_interval(s, e, times) for s, e in events)


class _DonorPool:
    """Event spans of every sample, by task; draws avoid the requesting sample."""

    def __init__(self, samples: Sequence[Sample]):
        self.by_task: dict[str, list[_Donor]] = collections.defaultdict(list)
        self.all: list[_Donor] = []
        for i, sample in enumerate(samples):
            if not sample.events:
                continue
            for span, interval in zip(split_event_spans(sample.answer).spans, sample.events, strict=True):
                donor = _Donor(sample_index=i, task=sample.task, span=span, interval=interval)
                self.by_task[sample.task].append(donor)
                self.all.append(donor)

    def draw(self, rng: np.random.Generator, task: str, *, exclude_sample: int,
             exclude_span: str | None, any_task: bool = True) -> _Donor | None:
        """A donor of the same task, else (``any_task``) of any task; None when none."""
        pools = (self.by_task.get(task, []), self.all) if any_task else (self.by_task.get(task, []),)
        for pool in pools:
            # A bounded number of random probes, then a scan: fast and deterministic.
            for _ in range(8):
                if not pool:
                    break
                donor = pool[rng.integers(len(pool))]
                if donor.sample_index != exclude_sample and donor.span != exclude_span:
                    return donor
            eligible = [d for d in pool if d.sample_index != exclude_sample and d.span != exclude_span]
            if eligible:
                return eligible[rng.integers(len(eligible))]
        return None


def _perturb(synth: _Synth, family: str, sample: Sample, k: int, rng: np.random.Generator,
             spans: EventSpans, donors: _DonorPool, sample_index: int) -> Rejected:
    if family == "temporal_shift":
        return synth.shift(sample, k, rng)
    if family == "temporal_stretch":
        return synth.stretch(sample, k, rng)
    if family == "temporal_swap":
        return synth.swap(sample, k, rng)
    if family == "text_replace":
        return synth.replace(sample, k, rng, spans, donors, sample_index)
    if family == "text_delete":
        return synth.delete(sample, k, spans)
    if family == "text_repeat":
        return synth.repeat(sample, k, spans)
    if family == "text_insert":
        return synth.insert(sample, k, rng, spans, donors, sample_index)
    raise PreferenceError(f"unknown preference family {family!r}; known: {ALL_FAMILIES}")


def make_preference_samples(samples: Sequence[Sample], *, seed: int, families: Sequence[str] = ALL_FAMILIES,
                            per_sample: int = 2, min_change_s: float = 1.0, frame_rate: float = 1.0,
                            max_frames: int | None = None, max_tries: int = 8
                            ) -> tuple[list[Sample], PreferenceCounts]:
    """Adds ``rejected`` responses to samples (see the module docstring for the families).

    Args:
      samples: validated ground-truth samples (their ``rejected`` is ignored and replaced).
      seed: the synthesis seed (same seed, same samples: same output).
      families: families to draw from (each rejected response of a sample uses a different
        family while there are unused applicable ones).
      per_sample: rejected responses per sample (fewer when not enough distinct ones exist;
        counted in ``samples_short``).
      min_change_s: smallest change of a perturbed interval endpoint in seconds.
      frame_rate, max_frames: the frame sampling used in training (``decode_video``); a
        temporal perturbation must change the frame interval under it.
      max_tries: attempts per (family, event) before dropping it.

    Returns:
      ``(samples with at least one rejected response, counts)``; samples without events are
      left out (counted in ``samples_without_events``).
    """
    unknown = [f for f in families if f not in ALL_FAMILIES]
    if unknown or not families:
        raise PreferenceError(f"unknown or no preference families {list(families)!r}; known: {ALL_FAMILIES}")
    if per_sample < 1 or max_tries < 1 or min_change_s <= 0 or frame_rate <= 0:
        raise PreferenceError(f"need per_sample >= 1, max_tries >= 1, min_change_s > 0, frame_rate > 0; got "
                              f"{per_sample}, {max_tries}, {min_change_s}, {frame_rate}")
    families = tuple(dict.fromkeys(families))
    synth = _Synth(min_change_s=min_change_s, frame_rate=frame_rate, max_frames=max_frames)
    donors = _DonorPool(samples)
    counts = PreferenceCounts()
    out: list[Sample] = []
    for index, sample in enumerate(samples):
        counts.samples_in += 1
        if not sample.events:
            counts.samples_without_events += 1
            continue
        rng = np.random.default_rng([seed, index])
        spans = split_event_spans(sample.answer)
        chosen_signature = synth.frame_signature(sample.answer, sample.events, sample.duration)
        seen = {chosen_signature}
        rejected: list[Rejected] = []
        num_events = len(sample.events)
        # Candidate (family, event) pairs: families in a random order, round-robin, so the
        # rejected responses of one sample differ in family first.
        family_order = [families[i] for i in rng.permutation(len(families))]
        event_orders = {f: [int(k) for k in rng.permutation(num_events + (f == "text_insert"))]
                        for f in family_order}
        candidates = [(f, event_orders[f][r]) for r in range(num_events + 1) for f in family_order
                      if r < len(event_orders[f])]
        tried: set[tuple[str, int]] = set()
        # First pass: one rejected response per family; second pass: families may repeat
        # (on other events) until ``per_sample`` is reached.
        for allow_repeat in (False, True):
            for family, k in candidates:
                used_families = {r.family for r in rejected}
                if len(rejected) >= per_sample:
                    break
                if (family, k) in tried or (not allow_repeat and family in used_families):
                    continue
                tried.add((family, k))
                for _ in range(max_tries):
                    try:
                        candidate = _perturb(synth, family, sample, k, rng, spans, donors, index)
                    except _NotApplicable:
                        counts.not_applicable[family] += 1
                        break
                    signature = synth.frame_signature(candidate.answer, candidate.events, sample.duration)
                    inside = all(0.0 <= s <= e <= sample.duration for s, e in candidate.events)
                    if inside and signature not in seen:
                        seen.add(signature)
                        rejected.append(candidate)
                        counts.made[family] += 1
                        break
                    counts.retried[family] += 1
                else:
                    counts.dropped[family] += 1
                    logger.info("sample %d (%s): dropped a %s perturbation of event %d after %d tries "
                                "(identical to the chosen or an earlier rejected response)",
                                index, sample.video, family, k, max_tries)
        if not rejected:
            continue
        if len(rejected) < per_sample:
            counts.samples_short += 1
        counts.samples_out += 1
        out.append(dataclasses.replace(sample, rejected=tuple(rejected)))
    return out, counts
