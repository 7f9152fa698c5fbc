"""The Grain pipeline on a tiny synthetic set: shards, resumable state, bad data, shapes."""

from __future__ import annotations

import json
import logging
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from d2vlm_jax.batch import FPO_KEYS, HOST_KEYS, SFT_KEYS
from d2vlm_jax.data import pipeline, synthetic, tfds_builder
from d2vlm_jax.data.collate import FIELD_DTYPES
from d2vlm_jax.data.preferences import make_preference_samples
from d2vlm_jax.data.schema import Sample, load_annotations, save_annotations
from d2vlm_jax.data.tokenizer import QFormerTokenizer, TextTokenizer
from d2vlm_jax.data.video import decode_video, seconds_to_frame_interval

IMAGE_SIZE = 28
MAX_FRAMES = 8
SETTINGS = synthetic.SyntheticSettings(min_duration=4, max_duration=6, frame_size=48, object_radius=8)
BAD_VIDEOS = {"videos/missing.mp4": "video_not_found", "videos/corrupt.mp4": "corrupt_video",
              "videos/empty.mp4": "empty_video"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 train clips (12 samples), 2 val clips (6 samples), plus a set with bad samples."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate_synthetic(root, num_train=4, num_val=2, seed=0, settings=SETTINGS)
    good = load_annotations(root / "train.json")
    (root / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "videos" / "empty.mp4").write_bytes(b"")
    bad = [Sample(video=video, duration=5.0, task="tvg", question="When does the red circle appear?",
                  answer="The red circle appears at <evi>.", events=((1.0, 2.0),)) for video in BAD_VIDEOS]
    long_answer = Sample(video=good[0].video, duration=good[0].duration, task="tvg", question="When?",
                         answer=" ".join(["red"] * 300) + " <evi>.", events=((0.0, 1.0),))
    wide_answer = Sample(video=good[0].video, duration=good[0].duration, task="tvg", question="When?",
                         answer=" ".join(["blue"] * 80) + " <evi>.", events=((0.0, 1.0),))
    save_annotations(good[:6] + bad[:2] + good[6:] + [bad[2], long_answer, wide_answer], root / "train_bad.json")
    save_annotations(bad, root / "all_bad.json")
    prefs, _ = make_preference_samples(good, seed=0, per_sample=2)
    save_annotations(prefs, root / "prefs.json")
    tokenizer = TextTokenizer(root / "tokenizer.json")
    qformer_tokenizer = QFormerTokenizer(root / "vocab.txt")
    return root, tokenizer, qformer_tokenizer


def config(root, train="train.json", evaluation="val.json", **overrides):
    c = pipeline.default_data_config()
    c.train_annotations = str(root / train)
    c.eval_annotations = str(root / evaluation)
    c.image_size = IMAGE_SIZE
    c.max_frames = MAX_FRAMES
    c.min_duration = 0.0
    c.template.max_length = 256
    c.buckets.N = [4, 8]
    c.buckets.L = [16, 32]
    c.buckets.P = [32, 64]
    c.buckets.R = [16, 32, 64]
    c.buckets.M = [4, 8]
    c.buckets.K = [2, 4]
    c.buckets.Q = [1]
    c.buckets.C = [2]
    c.read_threads = 1
    c.read_buffer_size = 4
    for key, value in overrides.items():
        c[key] = value
    return c


def train_iterator(dataset, c, *, batch=4, stage="sft", process_index=0, process_count=1, seed=0):
    _, tok, qtok = dataset
    return pipeline.make_train_iterator(c, stage=stage, tokenizer=tok, qformer_tokenizer=qtok,
                                        batch_size_per_host=batch, process_index=process_index,
                                        process_count=process_count, seed=seed)


def eval_batches(dataset, c, *, batch=4, process_index=0, process_count=1, stats=None, stage="sft"):
    _, tok, qtok = dataset
    return list(pipeline.make_eval_batches(c, stage=stage, tokenizer=tok, qformer_tokenizer=qtok,
                                           batch_size_per_host=batch, process_index=process_index,
                                           process_count=process_count, stats=stats))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------------------- contents


def test_batches_have_static_shapes_and_valid_contents(dataset):
    root, tok, qtok = dataset
    samples = load_annotations(root / "train.json")
    it = train_iterator(dataset, config(root, shape_policy="max"), batch=4)
    batches = take(it, 4)    # 16 rows: past the first epoch of 12
    it.close()
    shapes = {k: v.shape for k, v in batches[0].items()}
    assert set(shapes) == set(SFT_KEYS) | set(HOST_KEYS)
    assert shapes["frames"] == (4, 8, IMAGE_SIZE, IMAGE_SIZE, 3) and shapes["prefix_ids"] == (4, 64)
    for batch in batches:
        assert {k: v.shape for k, v in batch.items()} == shapes
        for key, value in batch.items():
            assert value.dtype == FIELD_DTYPES[key], key
    first_epoch = np.concatenate([b["example_id"] for b in batches])[:12]
    assert sorted(first_epoch) == list(range(12))
    image_token_id = tok.token_id("<image>")
    decoded = {}
    for batch in batches[:2]:
        for row in range(4):
            sample = samples[batch["example_id"][row]]
            if sample.video not in decoded:
                decoded[sample.video] = decode_video(root / sample.video, max_frames=MAX_FRAMES,
                                                     image_size=IMAGE_SIZE)
            video = decoded[sample.video]
            n = len(video.frame_times)
            np.testing.assert_array_equal(batch["frame_valid"][row], np.arange(8) < n)
            np.testing.assert_array_equal(batch["frames"][row, :n], video.frames)
            assert not batch["frames"][row, n:].any()
            np.testing.assert_array_equal(batch["frame_times"][row, :n], video.frame_times)
            positions = batch["frame_positions"][row, :n]
            assert (batch["prefix_ids"][row, positions] == image_token_id).all()
            q = qtok.encode(sample.question)
            np.testing.assert_array_equal(batch["qformer_ids"][row, :len(q)], q)
            assert batch["qformer_valid"][row].sum() == len(q)
            r = batch["response_valid"][row].sum()
            assert batch["response_ids"][row, r - 1] == tok.end_id
            expected = [seconds_to_frame_interval(s, e, video.frame_times) for s, e in sample.events]
            k = batch["event_valid"][row].sum()
            assert [tuple(x) for x in batch["event_intervals"][row, :k]] == expected
            assert batch["evi_valid"][row].sum() == 2 * len(sample.events)
            assert batch["question_evi_valid"][row].sum() == len(sample.question_events)


def test_bucket_policy_pads_to_the_smallest_fitting_bucket(dataset):
    root, _, _ = dataset
    it = train_iterator(dataset, config(root, shape_policy="bucket"), batch=2)
    for batch in take(it, 6):
        longest = batch["prefix_valid"].sum(1).max()
        assert batch["prefix_ids"].shape[1] == (32 if longest <= 32 else 64)
        assert batch["frames"].shape[1] == (4 if batch["frame_valid"].sum(1).max() <= 4 else 8)
    it.close()
    with pytest.raises(pipeline.DataError, match="shape_policy"):
        train_iterator(dataset, config(root, shape_policy="bucket"), process_count=2)


# ---------------------------------------------------------------------------- sharding, epochs, state


def test_process_shards_are_disjoint_and_cover_each_epoch(dataset):
    root, _, _ = dataset
    epochs = {}
    for process in range(2):
        it = train_iterator(dataset, config(root), batch=2, process_index=process, process_count=2, seed=5)
        ids = np.concatenate([b["example_id"] for b in take(it, 6)])    # two epochs of a 6-sample shard
        it.close()
        epochs[process] = (ids[:6], ids[6:])
    first0, first1 = set(epochs[0][0]), set(epochs[1][0])
    assert len(first0) == 6 and len(first1) == 6
    assert not first0 & first1 and first0 | first1 == set(range(12))
    for process in range(2):
        one, two = epochs[process]
        assert set(one) == set(two)                         # the same shard every epoch
    assert any(list(epochs[p][0]) != list(epochs[p][1]) for p in range(2))   # reshuffled


def test_iterator_state_restores_the_same_stream_through_orbax(dataset, tmp_path):
    root, _, _ = dataset
    c = config(root, train="train_bad.json", shape_policy="bucket")
    it = train_iterator(dataset, c, batch=3, seed=7)
    take(it, 2)
    state = it.get_state()
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        manager.save(1, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": np.asarray(1, np.int32)}),
            data_iter=grain.checkpoint.CheckpointSave(it)))
        expected = take(it, 4)    # the run goes on while the checkpoint is written
        manager.wait_until_finished()
    it.close()

    restored = train_iterator(dataset, c, batch=3, seed=7)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        out = manager.restore(1, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"step": np.asarray(0, np.int32)}),
            data_iter=grain.checkpoint.CheckpointRestore(restored)))
    assert int(out["state"]["step"]) == 1
    assert restored.get_state() == state
    assert_batches_equal(take(restored, 4), expected)
    restored.close()

    again = train_iterator(dataset, c, batch=3, seed=7)          # plain get_state / set_state
    again.set_state(state)
    assert_batches_equal(take(again, 4), expected)
    again.close()


# ---------------------------------------------------------------------------- bad data


def test_bad_samples_are_skipped_logged_and_counted(dataset, caplog):
    root, _, _ = dataset
    stats = pipeline.PipelineStats()
    with caplog.at_level(logging.WARNING, logger="d2vlm_jax.data.pipeline"):
        batches = eval_batches(dataset, config(root, evaluation="train_bad.json"), batch=4, stats=stats)
    assert dict(stats.skipped) == {"video_not_found": 1, "corrupt_video": 1, "empty_video": 1,
                                   "example_error": 1, "bucket_overflow": 1}
    assert stats.examples == 12
    ids = np.concatenate([b["example_id"] for b in batches])
    # File order: good[:6], missing, corrupt, good[6:], empty, long answer, wide answer.
    assert sorted(i for i in ids if i >= 0) == list(range(6)) + list(range(8, 14))
    assert len(batches) == 5 and (ids == -1).sum() == 20 - 12       # 17 records -> 5 batches of 4
    logged = caplog.text
    for video, reason in BAD_VIDEOS.items():
        assert video in logged and reason in logged
    assert "sequence too long" in logged and "larger than the largest bucket" in logged

    it = train_iterator(dataset, config(root, train="train_bad.json"), batch=4)   # training never crashes
    seen = np.concatenate([b["example_id"] for b in take(it, 8)])
    assert not set(seen) & {6, 7, 14, 15, 16}
    assert it.stats.num_skipped >= 5 and it.stats.examples == 32
    it.close()


def test_all_bad_data_fails_with_a_clear_error(dataset):
    root, _, _ = dataset
    it = train_iterator(dataset, config(root, train="all_bad.json"), batch=2)
    with pytest.raises(pipeline.DataError, match="every one of the 3 samples"):
        next(it)
    it.close()
    with pytest.raises(pipeline.DataError):
        eval_batches(dataset, config(root, evaluation="all_bad.json"))
    with pytest.raises(pipeline.DataError, match="data.train_annotations"):
        train_iterator(dataset, config(root, train="nope.json"))


def test_worker_processes_give_the_same_batches_and_exact_counts(dataset):
    root, _, _ = dataset
    reference = train_iterator(dataset, config(root, train="train_bad.json"), batch=4, seed=3)
    expected = take(reference, 5)
    reference.close()
    it = train_iterator(dataset, config(root, train="train_bad.json", workers=2), batch=4, seed=3)
    assert_batches_equal(take(it, 5), expected)
    assert it.stats.skipped == reference.stats.skipped and it.stats.examples == reference.stats.examples
    it.close()


# ---------------------------------------------------------------------------- eval, fpo, tfds


def test_eval_pass_pads_rows_and_batches_equally_on_every_process(dataset):
    root, _, _ = dataset
    batches = eval_batches(dataset, config(root), batch=4)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0]["example_id"], [0, 1, 2, 3])
    np.testing.assert_array_equal(batches[1]["example_id"], [4, 5, -1, -1])
    for key in batches[1]:
        if key.endswith("_valid") or key.endswith("_mask"):
            assert not batches[1][key][2:].any(), key
    per_process = [eval_batches(dataset, config(root, evaluation="train_bad.json"), batch=4, process_index=p,
                                process_count=2) for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == pipeline.num_eval_batches(17, 4, 2) == 3
    for a, b in zip(*per_process):
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ids = [set(np.concatenate([b["example_id"] for b in batches]).tolist()) - {-1} for batches in per_process]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(6)) | set(range(8, 14))


def test_preference_stage_batches(dataset):
    root, tok, _ = dataset
    prefs = load_annotations(root / "prefs.json")
    it = train_iterator(dataset, config(root, train="prefs.json", shape_policy="max"), batch=2, stage="fpo")
    for batch in take(it, 3):
        assert set(batch) == set(FPO_KEYS) | set(HOST_KEYS)
        assert batch["rejected_ids"].shape == (2, 2, 64) and batch["conflict_token_mask"].shape == (2, 2, 64)
        for row in range(2):
            sample = prefs[batch["example_id"][row]]
            np.testing.assert_array_equal(batch["rejected_valid_pair"][row],
                                          np.arange(2) < len(sample.rejected))
            for c, rejected in enumerate(sample.rejected):
                valid = batch["rejected_valid"][row, c]
                assert batch["rejected_ids"][row, c, valid.sum() - 1] == tok.end_id
                assert batch["rejected_event_valid"][row, c].sum() == len(rejected.events)
                assert batch["conflict_token_mask"][row, c].any()
                assert not (batch["conflict_token_mask"][row, c] & ~batch["response_valid"][row]).any()
    it.close()


def test_jpeg_frame_codec_round_trip():
    rng = np.random.default_rng(0)
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    frames[:, 8:24, 8:24] = rng.integers(0, 255, (3, 1, 1, 3))
    encoded = tfds_builder.encode_frames(frames, "jpeg")
    assert all(b[:2] == b"\xff\xd8" for b in encoded)       # JPEG SOI marker
    decoded = tfds_builder.decode_frames(encoded, "jpeg", 32)
    assert np.abs(decoded.astype(int) - frames).mean() < 2.0
    np.testing.assert_array_equal(tfds_builder.decode_frames(tfds_builder.encode_frames(frames, "raw"), "raw", 32),
                                  frames)
    with pytest.raises(tfds_builder.FramesError):
        tfds_builder.decode_frames([b"not a jpeg"], "jpeg", 32)


def test_tfds_packaged_source_matches_the_video_source(dataset, tmp_path):
    root, _, _ = dataset
    directory, skipped = tfds_builder.build_packaged_dataset(
        tmp_path / "tfds", name="tiny", train_annotations=str(root / "val.json"),
        eval_annotations=str(root / "train_bad.json"), image_size=IMAGE_SIZE, max_frames=MAX_FRAMES,
        frame_encoding="raw")
    assert sum(skipped.values()) == 3                                # missing, corrupt, empty
    assert os.path.isfile(os.path.join(directory, "dataset_info.json"))
    assert any(name.startswith("d2vlm_packaged-eval.array_record") for name in os.listdir(directory))
    from_videos = eval_batches(dataset, config(root, evaluation="train_bad.json", shape_policy="max"), batch=4)
    from_tfds = eval_batches(dataset, config(root, source="tfds", tfds_eval_dir=directory, shape_policy="max"),
                             batch=4)

    def rows(batches):
        return {int(b["example_id"][r]): {k: v[r] for k, v in b.items()}
                for b in batches for r in range(len(b["example_id"])) if b["example_id"][r] >= 0}

    a, b = rows(from_videos), rows(from_tfds)
    assert sorted(a) == sorted(b) and len(a) == 12
    for example_id in a:
        for key in a[example_id]:
            np.testing.assert_array_equal(a[example_id][key], b[example_id][key], err_msg=key)
    with pytest.raises(pipeline.DataError, match="tfds_train_dir"):
        train_iterator(dataset, config(root, source="tfds"))
    assert json.loads(open(os.path.join(directory, "dataset_info.json")).read())["name"] == "d2vlm_packaged"
