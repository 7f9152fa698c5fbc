"""Annotation schema (SPEC §2.3) and converters from E.T. Instruct / Charades-STA / YouCook2."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from d2vlm_jax.data import converters, schema
from d2vlm_jax.data.schema import AnnotationError, Sample, ValidationReport

GOOD = {"video": "clips/a.mp4", "duration": 31.2, "task": "tvg",
        "question": "When does the person open the fridge?",
        "answer": "The person opens the fridge at <evi>.",
        "events": [[3.0, 7.5]], "question_events": []}


def _with(**changes):
    record = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is KeyError:
            del record[key]
        else:
            record[key] = value
    return record


def _error(record, **kwargs) -> AnnotationError:
    with pytest.raises(AnnotationError) as info:
        schema.validate_sample(record, file="train.json", index=12, **kwargs)
    return info.value


# ------------------------------------------------------------------------------ schema


def test_valid_sample_and_round_trip(tmp_path):
    preference = _with(rejected=[{"answer": "The person opens the fridge at <evi>.",
                                  "events": [[10.0, 12.0]], "family": "temporal_shift",
                                  "event_index": 0}])
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, preference]))
    samples = schema.load_annotations(path)
    assert samples[0] == Sample(video="clips/a.mp4", duration=31.2, task="tvg",
                                question=GOOD["question"], answer=GOOD["answer"],
                                events=((3.0, 7.5),))
    assert samples[0].rejected is None
    rejected = samples[1].rejected[0]
    assert rejected.events == ((10.0, 12.0),) and rejected["family"] == "temporal_shift"
    out = tmp_path / "out.json"
    schema.save_annotations(samples, out)
    assert schema.load_annotations(out) == samples
    assert json.loads(out.read_text())[1]["rejected"][0]["event_index"] == 0


@pytest.mark.parametrize("record, field, fragment", [
    (_with(events=KeyError), "events", "missing required field"),
    (_with(duration="31"), "duration", "positive finite number"),
    (_with(duration=0), "duration", "positive finite number"),
    (_with(video="/abs/a.mp4"), "video", "relative"),
    (_with(video=""), "video", "must not be empty"),
    (_with(task=3), "task", "expected a string"),
    (_with(question=" "), "question", "must not be empty"),
    (_with(question="<image>\nWhen?"), "question", "<image>"),
    (_with(answer="<evi></evi> at <evi>."), "answer", "</evi>"),
    (_with(events=[[3.0, 7.5], [1.0, 2.0]]), "events", "has 2 interval(s) but 'answer' has 1"),
    (_with(question_events=[[1.0, 2.0]]), "question_events", "'question' has 0"),
    (_with(events=[[-1.0, 2.0]]), "events[0]", "start -1.0 is negative"),
    (_with(events=[[1.0, float("nan")]]), "events[0]", "not finite"),
    (_with(events=[[1.0, float("inf")]]), "events[0]", "not finite"),
    (_with(events=[[1.0, "2"]]), "events[0]", "is not a number"),
    (_with(events=[[1.0, True]]), "events[0]", "is not a number"),
    (_with(events=[[1.0]]), "events[0]", "pair"),
    (_with(events=[[3.0, 32.7]]), "events[0]", "beyond the duration 31.2 by 1.5 s"),
    (_with(events="3-7"), "events", "list"),
    (_with(rejected=[{"answer": "x <evi>", "events": [], "family": "f", "event_index": 0}]),
     "rejected[0].events", "has 0 interval(s) but 'rejected[0].answer' has 1"),
    (_with(rejected=[{"answer": "x", "events": [], "family": "f"}]),
     "rejected[0].event_index", "missing required field"),
    (_with(rejected=[{"answer": "x", "events": [], "family": "f", "event_index": -1}]),
     "rejected[0].event_index", "non-negative integer"),
    (_with(rejected=[{"answer": "x <evi>", "events": [[1, 40]], "family": "f",
                      "event_index": 0}]), "rejected[0].events[0]", "beyond the duration"),
])
def test_validation_errors_name_file_sample_and_field(record, field, fragment):
    error = _error(record)
    assert error.field == field
    assert str(error).startswith(f"train.json sample 12 field '{field}': ")
    assert fragment in str(error)


def test_question_events_counted_and_checked():
    sample = schema.validate_sample(
        _with(question="What happens at <evi>?", question_events=[[1, 2]]),
        file="f.json", index=0)
    assert sample.question_events == ((1.0, 2.0),)
    error = _error(_with(question="What happens at <evi>?", question_events=[[1, 40]]))
    assert error.field == "question_events[0]" and "by 8.8 s" in str(error)


def test_reversed_interval_is_swapped_logged_and_counted(caplog):
    report = ValidationReport()
    with caplog.at_level(logging.WARNING, logger="d2vlm_jax.data.schema"):
        sample = schema.validate_sample(_with(events=[[7.5, 3.0]]), file="train.json",
                                        index=4, report=report)
    assert sample.events == ((3.0, 7.5),)
    assert report.num_swapped == 1
    assert "train.json sample 4 field 'events[0]': end 3.0 is before start 7.5" in caplog.text


def test_load_skip_mode_counts_and_raise_mode_stops(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([GOOD, _with(events=[]), _with(events=[[5.0, 1.0]]),
                                _with(duration=-1)]))
    with pytest.raises(AnnotationError, match="mixed.json sample 1 field 'events'"):
        schema.load_annotations(path)
    report = ValidationReport()
    samples = schema.load_annotations(path, on_error="skip", report=report)
    assert len(samples) == 2
    assert (report.num_samples, report.num_valid, report.num_skipped, report.num_swapped) == (
        4, 2, 2, 1)
    assert "mixed.json sample 3 field 'duration'" in report.skipped_messages[1]


def test_load_file_level_errors(tmp_path):
    with pytest.raises(AnnotationError, match="file not found"):
        schema.load_annotations(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="invalid JSON"):
        schema.load_annotations(bad)
    bad.write_text(json.dumps(GOOD))
    with pytest.raises(AnnotationError, match="expected a JSON list"):
        schema.load_annotations(bad)


# -------------------------------------------------------------------------- converters

ET_VID = {
    "task": "tvg", "source": "qvhighlights", "video": "qvh/x.mp4", "duration": 60.0,
    "src": [12.0],
    "tgt": [36, 44, 49.5, 57],
    "conversations": [
        {"from": "human", "value": "<image>\nWhat happens around <vid>? List the steps."},
        {"from": "gpt", "value": "First step at <vid> - <vid> seconds, then from <vid> to "
                                 "<vid>."},
    ],
}

ET_EVI = {
    "task": "dvc", "video": "et/y.mp4", "duration": 40.0,
    "src": [2, 4], "tgt": [10, 12, 15, 20],
    "conversations": [
        {"from": "human", "value": "After <evi>, describe the events.\n<image>"},
        {"from": "gpt", "value": "<evi><evi></evi> A man cuts bread at <evi>. He eats it "
                                 "at <evi>."},
    ],
}


def test_et_instruct_vid_style():
    sample = converters.convert_et_instruct(ET_VID, file="et.json", index=0)
    assert sample.question == "What happens around <evi>? List the steps."
    assert sample.question_events == ((12.0, 12.0),)
    assert sample.answer == "First step at <evi>, then from <evi>."
    assert sample.events == ((36.0, 44.0), (49.5, 57.0))
    assert sample.task == "tvg" and sample.video == "qvh/x.mp4"


def test_et_bench_pairs_and_video_format():
    record = copy.deepcopy(ET_VID)
    record["tgt"] = [[36, 44], [49.5, 57]]
    sample = converters.convert_et_instruct(record, file="et.json", index=0,
                                            video_format="videos/{video}")
    assert sample.events == ((36.0, 44.0), (49.5, 57.0))
    assert sample.video == "videos/qvh/x.mp4"


def test_et_instruct_evi_style_with_grounding_stage():
    sample = converters.convert_et_instruct(ET_EVI, file="d2.json", index=3)
    assert sample.question == "After <evi>, describe the events."
    assert sample.question_events == ((2.0, 4.0),)
    assert sample.answer == "A man cuts bread at <evi>. He eats it at <evi>."
    assert sample.events == ((10.0, 12.0), (15.0, 20.0))


def _et_error(record, **kwargs) -> AnnotationError:
    with pytest.raises(AnnotationError) as info:
        converters.convert_et_instruct(record, file="et.json", index=7, **kwargs)
    return info.value


@pytest.mark.parametrize("change, field, fragment", [
    (lambda r: r.update(tgt=[36, 44, 49.5]), "tgt", "has 3 timestamp(s) but "
                                                    "'conversations[1].value' has 4"),
    (lambda r: r.update(src=None), "src", "has 0 timestamp(s)"),
    (lambda r: r.update(tgt=[36, 44, 49.5, 70]), "tgt (event 1)", "beyond the duration 60.0 "
                                                                  "by 10 s"),
    (lambda r: r.update(tgt=[36, -1, 49.5, 57]), "tgt (event 0)", "negative"),
    (lambda r: r.update(tgt=[36, "44", 49.5, 57]), "tgt[1]", "not a number"),
    (lambda r: r.update(tgt=[[36, 44, 1]]), "tgt[0]", "pair"),
    (lambda r: r["conversations"][0].update({"from": "gpt"}), "conversations[0].from",
     "expected 'human'"),
    (lambda r: r["conversations"].pop(), "conversations", "one human and one gpt turn"),
    (lambda r: r.pop("duration"), "duration", "missing"),
    (lambda r: r.update(duration="long"), "duration", "positive finite"),
    (lambda r: r["conversations"][1].update(value="at <vid> and <evi>"), "conversations",
     "mixes"),
])
def test_et_instruct_errors_name_the_source_field(change, field, fragment):
    record = copy.deepcopy(ET_VID)
    change(record)
    error = _et_error(record)
    assert error.field == field, str(error)
    assert str(error).startswith(f"et.json sample 7 field '{field}': ")
    assert fragment in str(error)


@pytest.mark.parametrize("change, field, fragment", [
    (lambda r: r.update(tgt=[10, 12, 15]), "tgt", "expected 4"),
    (lambda r: r.update(src=[2, 4, 5]), "src", "expected 2"),
    (lambda r: r["conversations"][1].update(value="<evi></evi> at <evi> and <evi>."),
     "conversations[1].value", "grounding stage has 1"),
    (lambda r: r["conversations"][1].update(value="</evi> x </evi>"),
     "conversations[1].value", "more than one"),
])
def test_et_instruct_evi_style_errors(change, field, fragment):
    record = copy.deepcopy(ET_EVI)
    change(record)
    error = _et_error(record)
    assert error.field == field, str(error)
    assert fragment in str(error)


def test_et_instruct_evi_single_src_value_is_a_point():
    record = copy.deepcopy(ET_EVI)
    record["src"] = [3]
    assert converters.convert_et_instruct(record, file="d", index=0).question_events == (
        (3.0, 3.0),)


def test_charades_sta():
    record = {"video": "AO8RW", "duration": 33.8, "query": "a person opens a door.",
              "timestamp": [4.2, 11.0]}
    sample = converters.convert_charades_sta(record, file="charades.json", index=0,
                                             video_format="charades/{video}.mp4")
    assert sample.video == "charades/AO8RW.mp4"
    assert sample.question == 'When does "a person opens a door" happen in the video?'
    assert sample.answer == "It happens at <evi>." and sample.events == ((4.2, 11.0),)
    record = {"video": "x.mp4", "duration": 10, "sentence": "someone laughs",
              "timestamp": [2, 3]}
    assert "someone laughs" in converters.convert_charades_sta(record, file="c",
                                                               index=0).question


@pytest.mark.parametrize("record, field, fragment", [
    ({"video": "a", "duration": 10, "query": "q"}, "timestamp", "missing"),
    ({"video": "a", "duration": 10, "query": "q", "timestamp": [1]}, "timestamp",
     "[start, end]"),
    ({"video": "a", "duration": 10, "query": "q", "timestamp": [1, 12.5]}, "timestamp",
     "beyond the duration 10.0 by 2.5 s"),
    ({"video": "a", "duration": 10, "query": " ", "timestamp": [1, 2]}, "query", "non-empty"),
    ({"video": "a", "duration": 10, "timestamp": [1, 2]}, "sentence", "non-empty"),
    ({"video": "a", "duration": 10, "query": "x <evi>", "timestamp": [1, 2]}, "query",
     "special token"),
])
def test_charades_sta_errors(record, field, fragment):
    with pytest.raises(AnnotationError) as info:
        converters.convert_charades_sta(record, file="charades.json", index=2)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"charades.json sample 2 field '{field}'")
    assert fragment in str(info.value)


def test_dense_captions():
    record = {"video": "yc2/v.mp4", "duration": 200.0,
              "timestamps": [[10, 20], [30.5, 41]],
              "sentences": ["crack the eggs", "whisk them well!"]}
    sample = converters.convert_dense_captions(record, file="yc2.json", index=0)
    assert sample.task == "dvc"
    assert sample.answer == "<evi> crack the eggs. <evi> whisk them well!"
    assert sample.events == ((10.0, 20.0), (30.5, 41.0))


@pytest.mark.parametrize("change, field, fragment", [
    (lambda r: r["sentences"].pop(), "sentences", "has 1 sentence(s) but 'timestamps' has 2"),
    (lambda r: r.update(timestamps=[[10, 20], [30, 250]]), "timestamps[1]",
     "beyond the duration 200.0 by 50 s"),
    (lambda r: r.update(timestamps=[]), "timestamps", "non-empty"),
    (lambda r: r["sentences"].__setitem__(0, ""), "sentences[0]", "non-empty"),
    (lambda r: r["sentences"].__setitem__(1, "<image> x"), "sentences[1]", "special token"),
    (lambda r: r.pop("sentences"), "sentences", "missing"),
])
def test_dense_captions_errors(change, field, fragment):
    record = {"video": "yc2/v.mp4", "duration": 200.0, "timestamps": [[10, 20], [30, 41]],
              "sentences": ["a", "b"]}
    change(record)
    with pytest.raises(AnnotationError) as info:
        converters.convert_dense_captions(record, file="yc2.json", index=5)
    assert info.value.field == field, str(info.value)
    assert fragment in str(info.value)


def test_convert_file_skip_mode(tmp_path):
    good = {"video": "a.mp4", "duration": 10, "query": "q", "timestamp": [5, 2]}
    bad = {"video": "b.mp4", "duration": 10, "query": "q", "timestamp": [5, 20]}
    path = tmp_path / "charades.json"
    path.write_text(json.dumps([good, bad, good]))
    report = ValidationReport()
    samples = converters.convert_file(path, "charades_sta", on_error="skip", report=report)
    assert [s.events for s in samples] == [((2.0, 5.0),)] * 2
    assert (report.num_valid, report.num_skipped, report.num_swapped) == (2, 1, 2)
    assert "charades.json sample 1 field 'timestamp'" in report.skipped_messages[0]
    with pytest.raises(AnnotationError, match="sample 1 field 'timestamp'"):
        converters.convert_file(path, "charades_sta")
    with pytest.raises(ValueError, match="unknown source format"):
        converters.convert_file(path, "nope")
