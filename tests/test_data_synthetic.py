"""The synthetic shapes dataset: determinism, annotations, ground truth, blind baseline."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from d2vlm_jax.data import schema, synthetic
from d2vlm_jax.data.video import decode_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("synthetic")
    manifest = synthetic.generate_synthetic(out_dir, num_train=4, num_val=2, seed=3)
    return str(out_dir), manifest


def test_files_manifest_and_annotations(dataset):
    out_dir, manifest = dataset
    for name in ("train.json", "val.json", "clips.json", "manifest.json"):
        assert os.path.exists(os.path.join(out_dir, name)), name
    assert manifest["seed"] == 3
    assert manifest["num_clips"] == {"train": 4, "val": 2}
    assert manifest["num_samples"] == {"train": 12, "val": 6}
    assert manifest["generator_version"] == synthetic.GENERATOR_VERSION
    assert manifest["settings"] == dataclasses.asdict(synthetic.SyntheticSettings())
    with open(os.path.join(out_dir, "manifest.json")) as f:
        assert json.load(f) == manifest
    train = schema.load_annotations(os.path.join(out_dir, "train.json"))
    assert [s.task for s in train[:3]] == ["tvg", "dvc", "rvc"]
    for sample in train:
        assert os.path.exists(os.path.join(out_dir, sample.video))
        assert sample.answer.count("<evi>") == len(sample.events) >= 1
        if sample.task == "rvc":
            assert sample.question_events == sample.events
            assert sample.question == "What appears at <evi>?"
        else:
            assert sample.question_events == ()


def test_tokenizers_written_and_know_the_vocabulary(dataset):
    out_dir, manifest = dataset
    import tokenizers  # a required dependency: never skip
    llm = tokenizers.Tokenizer.from_file(os.path.join(out_dir, manifest["tokenizers"]["llm"]))
    evi_id = llm.token_to_id("<evi>")
    assert evi_id is not None
    ids = llm.encode("The red circle appears at <evi>.").ids
    assert ids.count(evi_id) == 1
    assert llm.token_to_id("<unk>") not in ids
    assert os.path.exists(os.path.join(out_dir, manifest["tokenizers"]["qformer"]))


def test_deterministic_by_seed(dataset, tmp_path):
    out_dir, _ = dataset
    again = tmp_path / "again"
    synthetic.generate_synthetic(again, num_train=4, num_val=2, seed=3)
    for name in ("train.json", "val.json", "clips.json", "manifest.json", "tokenizer.json"):
        with open(os.path.join(out_dir, name), "rb") as a, open(again / name, "rb") as b:
            assert a.read() == b.read(), name
    spec = synthetic.make_clip_spec(3, "train", 1)
    np.testing.assert_array_equal(synthetic.render_clip(spec),
                                  synthetic.render_clip(synthetic.make_clip_spec(3, "train", 1)))
    # Clip i depends only on (seed, split, i), not on how many clips are written.
    smaller = tmp_path / "smaller"
    synthetic.generate_synthetic(smaller, num_train=2, num_val=0, seed=3,
                                 write_tokenizers=False)
    first = schema.load_annotations(smaller / "train.json")
    assert first == schema.load_annotations(os.path.join(out_dir, "train.json"))[:6]
    # Another seed gives other clips.
    other = [synthetic.make_clip_spec(4, "train", i) for i in range(4)]
    same = [synthetic.make_clip_spec(3, "train", i) for i in range(4)]
    assert [o.events for o in other] != [s.events for s in same]


def test_rendered_objects_visible_exactly_on_their_interval():
    for index in range(6):
        spec = synthetic.make_clip_spec(11, "train", index)
        frames = synthetic.render_clip(spec)
        assert frames.shape == (spec.duration * 4, 64, 64, 3) and frames.dtype == np.uint8
        starts = [e.start for e in spec.events]
        assert starts == sorted(set(starts))                  # distinct, ordered
        assert len({e.lane for e in spec.events}) == len(spec.events)
        for event in spec.events:
            assert 0 <= event.start <= event.end <= spec.duration - 1
            assert event.end - event.start + 1 <= spec.duration // 3
            colour = np.asarray(synthetic.COLOURS[event.colour])
            top, bottom = event.lane * 64 // 3, (event.lane + 1) * 64 // 3
            for j, frame in enumerate(frames):
                count = np.all(frame[top:bottom] == colour, axis=-1).sum()
                visible = event.start <= j / 4 <= event.end
                assert (count > 100) == visible, (index, event, j, count)


def test_samples_match_specs(dataset):
    out_dir, _ = dataset
    with open(os.path.join(out_dir, "clips.json")) as f:
        clips = json.load(f)
    train = schema.load_annotations(os.path.join(out_dir, "train.json"))
    for index, record in enumerate(clips["train"]):
        spec = synthetic.make_clip_spec(3, "train", index)
        assert record == json.loads(json.dumps(spec.to_dict()))
        tvg, dvc, rvc = train[3 * index: 3 * index + 3]
        asked = spec.events[spec.tvg_event]
        assert asked.name in tvg.question and asked.name in tvg.answer
        assert tvg.events == ((asked.start, asked.end),)
        assert dvc.events == tuple((e.start, e.end) for e in spec.events)
        assert dvc.answer == " ".join(f"<evi> a {e.name} appears." for e in spec.events)
        assert rvc.answer == f"A {spec.events[spec.rvc_event].name} appears at <evi>."


def test_written_video_decodes_to_the_rendering(dataset):
    out_dir, _ = dataset
    spec = synthetic.make_clip_spec(3, "val", 1)
    decoded = decode_video(os.path.join(out_dir, spec.video), image_size=64)
    truth = synthetic.render_clip(spec)[::spec.settings.video_fps]
    assert decoded.frames.shape == truth.shape
    assert np.abs(decoded.frames.astype(np.int32) - truth).mean() < 3.0


def test_video_blind_baseline_is_poor():
    """Event times are uniform per clip: the most common training interval is a bad guess."""
    def samples(split, count):
        return [s for i in range(count)
                for s in synthetic.clip_samples(synthetic.make_clip_spec(0, split, i))]
    baseline = synthetic.blind_baseline(samples("train", 300), samples("val", 100))
    for guess in ("most_common", "whole_video"):
        assert baseline[f"{guess}_val_miou"] < 0.3, baseline
        assert baseline[f"{guess}_val_r_at_0_5"] < 0.1, baseline
    # Event starts cover the clip: no second holds more than a small share of them.
    starts = [e[0] for s in samples("train", 300) if s.task == "dvc" for e in s.events]
    counts = np.bincount(np.asarray(starts, int))
    assert counts.max() / counts.sum() < 0.15


def test_settings_validation():
    with pytest.raises(ValueError, match="max_events"):
        synthetic.SyntheticSettings(max_events=4)
    with pytest.raises(ValueError, match="too small"):
        synthetic.SyntheticSettings(frame_size=32)
