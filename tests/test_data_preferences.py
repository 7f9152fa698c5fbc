"""Factorized preference synthesis (SPEC §4.3): each family changes exactly its factor, and the
conflict masks of the packed preference example start where that change starts (SPEC §4.1)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from d2vlm_jax.data import synthetic
from d2vlm_jax.data.preferences import (ALL_FAMILIES, TEMPORAL_FAMILIES, PreferenceError, make_preference_samples,
                                        split_event_spans)
from d2vlm_jax.data.schema import Sample, load_annotations, save_annotations, validate_sample
from d2vlm_jax.data.template import TemplateConfig, build_preference_example
from d2vlm_jax.data.tokenizer import QFormerTokenizer, TextTokenizer, train_tiny_tokenizers
from d2vlm_jax.data.video import seconds_to_frame_interval

# The sample under test (index 0) has three events; the others are donors for replace/insert.
TARGET = Sample(video="videos/a.mp4", duration=20.0, task="dvc", question="Describe all events with their times.",
                answer="<evi> a red circle appears. <evi> a blue square appears. <evi> a green diamond appears.",
                events=((2.0, 5.0), (8.0, 10.0), (13.0, 17.0)))
DONORS = [
    Sample(video="videos/b.mp4", duration=12.0, task="dvc", question="Describe all events with their times.",
           answer="<evi> a yellow triangle appears. <evi> a red square appears.", events=((1.0, 3.0), (6.0, 9.0))),
    Sample(video="videos/c.mp4", duration=9.0, task="tvg", question="When does the blue circle appear?",
           answer="The blue circle appears at <evi>.", events=((3.0, 6.0),)),
    Sample(video="videos/d.mp4", duration=9.0, task="dvc", question="Describe all events with their times.",
           answer="No event.", events=()),
]
SAMPLES = [TARGET] + DONORS
FRAME_TIMES = np.arange(20, dtype=np.float32)  # 1 fps over the 20 s target video


def only(family: str, seed: int = 0) -> Sample:
    """The target sample with one rejected response of ``family``."""
    out, counts = make_preference_samples(SAMPLES, seed=seed, families=[family], per_sample=1)
    assert counts.made[family] >= 1
    target = [s for s in out if s.video == TARGET.video]
    assert len(target) == 1 and len(target[0].rejected) == 1
    return target[0]


def frame_interval(interval) -> tuple[int, int]:
    return seconds_to_frame_interval(interval[0], interval[1], FRAME_TIMES)


# ---------------------------------------------------------------------------- spans


@pytest.mark.parametrize("answer, spans", [
    ("The red circle appears at <evi>.", ["The red circle appears at <evi>."]),
    ("<evi> a red circle appears. <evi> a blue square appears.",
     ["<evi> a red circle appears.", "<evi> a blue square appears."]),
    ("Hi. It opens at <evi> and closes at <evi>! Then <evi> a cat sits, <evi> it leaves",
     ["It opens at <evi>", "and closes at <evi>!", "Then <evi> a cat sits,", "<evi> it leaves"]),
    ("No event here.", []),
])
def test_split_event_spans(answer, spans):
    result = split_event_spans(answer)
    assert list(result.spans) == spans
    assert result.join() == answer
    assert len(result.gaps) == len(spans) + 1


# ---------------------------------------------------------------------------- families


def test_temporal_shift_moves_one_interval_keeping_length_and_text():
    rejected = only("temporal_shift").rejected[0]
    k = rejected.event_index
    assert rejected.family == "temporal_shift"
    assert rejected.answer == TARGET.answer
    assert len(rejected.events) == len(TARGET.events)
    for j, (new, old) in enumerate(zip(rejected.events, TARGET.events)):
        if j != k:
            assert new == old
    (s, e), (s0, e0) = rejected.events[k], TARGET.events[k]
    assert e - s == pytest.approx(e0 - s0, abs=2e-3)
    assert abs(s - s0) >= 1.0 - 1e-3
    assert 0.0 <= s <= e <= TARGET.duration
    assert frame_interval(rejected.events[k]) != frame_interval(TARGET.events[k])


def test_temporal_stretch_changes_length_about_the_centre():
    rejected = only("temporal_stretch").rejected[0]
    k = rejected.event_index
    assert rejected.answer == TARGET.answer
    assert [e for j, e in enumerate(rejected.events) if j != k] == [e for j, e in enumerate(TARGET.events) if j != k]
    (s, e), (s0, e0) = rejected.events[k], TARGET.events[k]
    assert abs((e - s) - (e0 - s0)) >= 2.0 - 1e-3    # at least 2 * min_change_s
    assert 0.0 <= s <= e <= TARGET.duration
    if 0.0 < s and e < TARGET.duration:               # not clipped: same centre
        assert (s + e) / 2 == pytest.approx((s0 + e0) / 2, abs=2e-3)


def test_temporal_swap_exchanges_two_intervals():
    rejected = only("temporal_swap").rejected[0]
    assert rejected.answer == TARGET.answer
    changed = [j for j in range(3) if rejected.events[j] != TARGET.events[j]]
    assert len(changed) == 2
    a, b = changed
    assert rejected.events[a] == TARGET.events[b] and rejected.events[b] == TARGET.events[a]
    assert rejected.event_index == a


def test_text_replace_changes_one_span_keeping_intervals():
    rejected = only("text_replace").rejected[0]
    k = rejected.event_index
    assert rejected.events == TARGET.events
    old, new = split_event_spans(TARGET.answer), split_event_spans(rejected.answer)
    assert len(new.spans) == 3 and new.gaps == old.gaps
    assert [s for j, s in enumerate(new.spans) if j != k] == [s for j, s in enumerate(old.spans) if j != k]
    assert new.spans[k] != old.spans[k]
    pool = {s for sample in SAMPLES for s in split_event_spans(sample.answer).spans}
    assert new.spans[k] in pool


def test_text_delete_removes_span_evidence_and_interval():
    rejected = only("text_delete").rejected[0]
    k = rejected.event_index
    assert rejected.events == TARGET.events[:k] + TARGET.events[k + 1:]
    old = split_event_spans(TARGET.answer).spans
    assert list(split_event_spans(rejected.answer).spans) == list(old[:k] + old[k + 1:])
    assert "  " not in rejected.answer and rejected.answer == rejected.answer.strip()


def test_text_repeat_duplicates_span_and_interval():
    rejected = only("text_repeat").rejected[0]
    k = rejected.event_index
    assert rejected.events == TARGET.events[:k + 1] + TARGET.events[k:]
    old = split_event_spans(TARGET.answer).spans
    assert list(split_event_spans(rejected.answer).spans) == list(old[:k + 1] + old[k:])


def test_text_insert_adds_a_foreign_event():
    rejected = only("text_insert").rejected[0]
    k = rejected.event_index
    assert len(rejected.events) == 4
    assert rejected.events[:k] + rejected.events[k + 1:] == TARGET.events
    old, new = split_event_spans(TARGET.answer).spans, split_event_spans(rejected.answer).spans
    assert list(new[:k] + new[k + 1:]) == list(old)
    donor_spans = {s: e for d in DONORS for s, e in zip(split_event_spans(d.answer).spans, d.events)}
    assert new[k] in donor_spans and new[k] not in old
    assert rejected.events[k] == donor_spans[new[k]]   # the donor interval fits into 20 s as is


def test_deterministic_valid_and_counted(tmp_path):
    a, counts_a = make_preference_samples(SAMPLES, seed=3, per_sample=3)
    b, _ = make_preference_samples(SAMPLES, seed=3, per_sample=3)
    c, _ = make_preference_samples(SAMPLES, seed=4, per_sample=3)
    assert a == b and a != c
    assert counts_a.samples_without_events == 1 and counts_a.samples_out == 3
    assert sum(counts_a.made.values()) == sum(len(s.rejected) for s in a)
    for sample in a:
        families = [r.family for r in sample.rejected]
        assert len(set(families)) == len(families)             # distinct families first
        for r in sample.rejected:
            assert all(0.0 <= s <= e <= sample.duration for s, e in r.events)
            assert (r.answer, r.events) != (sample.answer, sample.events)
        # Round trip through the schema validator (event counts, bounds).
        path = tmp_path / "p.json"
        save_annotations([sample], path)
        assert load_annotations(path) == [sample]
    with pytest.raises(PreferenceError, match="unknown"):
        make_preference_samples(SAMPLES, seed=0, families=["temporal_jump"])


def test_identical_perturbations_are_dropped_and_counted():
    # A one-frame video: every interval maps to frame 0, so no temporal change is visible.
    sample = Sample(video="v.mp4", duration=1.0, task="tvg", question="When?", answer="It is at <evi>.",
                    events=((0.0, 0.4),))
    out, counts = make_preference_samples([sample], seed=0, families=["temporal_stretch"], per_sample=1,
                                          min_change_s=0.1, max_tries=3)
    assert out == []
    assert counts.dropped["temporal_stretch"] == 1 and counts.retried["temporal_stretch"] == 3


# ---------------------------------------------------------------------------- conflicts


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    llm, vocab = train_tiny_tokenizers(synthetic.tokenizer_corpus(), directory)
    return TextTokenizer(llm), QFormerTokenizer(vocab)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_conflict_masks_start_at_the_perturbation(family, seed, tokenizers):
    tok, qtok = tokenizers
    sample = only(family, seed)
    rejected = sample.rejected[0]
    example = build_preference_example(sample, frame_times=FRAME_TIMES, tokenizer=tok, qformer_tokenizer=qtok,
                                       config=TemplateConfig(image_token_id=0, train=False))
    num_events = len(TARGET.events)
    chosen_ids = example["response_ids"]
    evi = example["evi_positions"]                      # K grounding-stage then K answer-stage <evi>
    assert evi.size == 2 * num_events
    rejected_ids = example["rejected_ids"][0][example["rejected_valid"][0]]
    k = rejected.event_index
    if family in TEMPORAL_FAMILIES:
        # Same tokens; the conflict starts at event k's grounding-stage <evi>: its interval
        # differs, the tokens after it see different injected features.
        np.testing.assert_array_equal(rejected_ids, chosen_ids)
        start = evi[k]
        expected_tokens = np.arange(chosen_ids.size) > start
    elif family == "text_replace":
        # Grounding stage identical; the first differing token lies inside span k of the
        # answer: after event k's answer-stage <evi> (spans start with <evi> here).
        mismatch = np.flatnonzero(chosen_ids[:rejected_ids.size] != rejected_ids[:chosen_ids.size])
        start = mismatch[0]
        assert evi[num_events + k] < start and (k + 1 == num_events or start < evi[num_events + k + 1])
        expected_tokens = np.arange(chosen_ids.size) >= start
    else:
        # text_delete / text_repeat / text_insert change the number of events. The k-th
        # grounding-stage <evi> of both branches now refers to different events: the conflict
        # starts at the first grounding <evi> whose frame interval differs (interval kind);
        # if none does, where the shorter grounding stage ends: the token after its last
        # <evi> is </evi> in one branch and a separator in the other (token kind).
        chosen_frames = [frame_interval(e) for e in TARGET.events]
        rejected_frames = [frame_interval(e) for e in rejected.events]
        common = min(len(chosen_frames), len(rejected_frames))
        differing = [g for g in range(common) if chosen_frames[g] != rejected_frames[g]]
        if differing:
            start = evi[differing[0]]
            interval_kind = True
            expected_tokens = np.arange(chosen_ids.size) > start
        else:
            start = evi[common - 1] + 1
            interval_kind = False
            shorter, longer = ((chosen_ids, rejected_ids) if len(chosen_frames) < len(rejected_frames)
                               else (rejected_ids, chosen_ids))
            assert shorter[start] == tok.evi_end_id and longer[start] != tok.evi_end_id
            expected_tokens = np.arange(chosen_ids.size) >= start
    np.testing.assert_array_equal(chosen_ids[:start], rejected_ids[:start])
    np.testing.assert_array_equal(example["conflict_token_mask"][0], expected_tokens)
    np.testing.assert_array_equal(example["conflict_evi_mask"][0], evi >= start)
    rejected_tokens = example["rejected_conflict_token_mask"][0][example["rejected_valid"][0]]
    first = start + 1 if (family in TEMPORAL_FAMILIES or (family in ("text_delete", "text_repeat", "text_insert")
                                                          and interval_kind)) else start
    np.testing.assert_array_equal(rejected_tokens, np.arange(rejected_ids.size) >= first)
    rejected_evi = example["rejected_evi_positions"][0][example["rejected_evi_valid"][0]]
    np.testing.assert_array_equal(example["rejected_conflict_evi_mask"][0][example["rejected_evi_valid"][0]],
                                  rejected_evi >= start)
    # The rejected intervals in frames are those of the rejected events.
    expected_frames = [frame_interval(e) for e in rejected.events]
    got = example["rejected_event_intervals"][0][example["rejected_event_valid"][0]]
    assert [tuple(x) for x in got] == expected_frames


# ---------------------------------------------------------------------------- launcher


def test_make_preferences_launcher(tmp_path):
    src = tmp_path / "train.json"
    save_annotations(SAMPLES, src)
    out = tmp_path / "prefs.json"
    result = subprocess.run([sys.executable, "launch/make_preferences.py", f"--input={src}", f"--output={out}",
                             "--seed=1", "--per_sample=2", "--families=temporal_shift,text_repeat"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "temporal_shift" in result.stdout and "text_repeat" in result.stdout
    records = json.loads(out.read_text())
    assert len(records) == 3
    for i, record in enumerate(records):
        sample = validate_sample(record, file="prefs.json", index=i)
        assert {r.family for r in sample.rejected} <= {"temporal_shift", "text_repeat"}
    expected, _ = make_preference_samples(SAMPLES, seed=1, per_sample=2, families=["temporal_shift", "text_repeat"])
    assert [validate_sample(r, file="p", index=i) for i, r in enumerate(records)] == expected
