"""Video decoding: round trip against the synthetic generator, sampling, resize, errors."""

from __future__ import annotations

import fractions
import os

import av
import numpy as np
import pytest

from d2vlm_jax.data import synthetic
from d2vlm_jax.data.video import (CorruptVideoError, EmptyVideoError, VideoError,
                                  VideoNotFoundError, VideoTooLongError, VideoTooShortError,
                                  antialias_bilinear_weights, decode_video,
                                  resize_center_crop, seconds_to_frame_interval)

SETTINGS = synthetic.SyntheticSettings()
# Mean |decoded - rendered| per frame must stay below this many grey levels. H.264 at
# crf 12 with 4:2:0 chroma subsampling is lossy: flat regions come back within ~1 level,
# but the chroma of the saturated 18 px objects is averaged over 2x2 blocks, so edge
# pixels can be off by >100 levels. Measured mean error is ~1.0 (max over clips ~1.7);
# 3.0 leaves margin for encoder version differences while a wrong frame (an object
# missing or shifted by a second of motion) costs far more (checked below).
MEAN_ABS_TOLERANCE = 3.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """One synthetic clip written to mp4: (spec, rendered frames, path)."""
    spec = next(s for s in (synthetic.make_clip_spec(7, "train", i) for i in range(50))
                if len(s.events) >= 2 and s.duration >= 12 and s.events[1].start >= 1)
    frames = synthetic.render_clip(spec)
    path = str(tmp_path_factory.mktemp("video") / "clip.mp4")
    synthetic.write_clip(frames, path, fps=SETTINGS.video_fps, crf=SETTINGS.crf)
    return spec, frames, path


def _object_fraction(frame: np.ndarray, event: synthetic.ObjectEvent) -> float:
    """Fraction of the event's lane whose pixels are close to the event's colour."""
    size = frame.shape[0]
    top, bottom = int(event.lane * size / 3), int((event.lane + 1) * size / 3)
    lane = frame[top:bottom].astype(np.int32)
    colour = np.asarray(synthetic.COLOURS[event.colour], np.int32)
    close = np.abs(lane - colour).max(axis=-1) < 60
    return float(close.mean())


def test_round_trip_matches_generator_and_events_map_to_frames(clip):
    spec, rendered, path = clip
    decoded = decode_video(path, image_size=SETTINGS.frame_size)
    assert decoded.frames.dtype == np.uint8
    assert decoded.frames.shape == (spec.duration, 64, 64, 3)
    np.testing.assert_array_equal(decoded.frame_times, np.arange(spec.duration))
    assert decoded.frame_times.dtype == np.float32
    assert decoded.duration == pytest.approx(spec.duration)
    truth = rendered[::SETTINGS.video_fps]             # 1 fps: frame k is second k
    errors = np.abs(decoded.frames.astype(np.int32) - truth.astype(np.int32))
    per_frame = errors.mean(axis=(1, 2, 3))
    assert per_frame.max() < MEAN_ABS_TOLERANCE, per_frame
    # A frame one second off would fail the tolerance: where an object appears, the
    # decoded frame differs from the previous second's rendering by more than it.
    appearing = [e.start for e in spec.events if e.start >= 1]
    assert appearing
    for k in appearing:
        off_by_one = np.abs(decoded.frames[k].astype(np.int32) - truth[k - 1].astype(np.int32))
        assert off_by_one.mean() > MEAN_ABS_TOLERANCE, (k, off_by_one.mean())

    for event in spec.events:
        first, last = seconds_to_frame_interval(event.start, event.end, decoded.frame_times)
        assert (first, last) == (event.start, event.end)
        present = [_object_fraction(frame, event) for frame in decoded.frames]
        area = np.pi * SETTINGS.object_radius ** 2 / (64 * 64 / 3)   # ~0.37 for a circle
        for k, fraction in enumerate(present):
            if first <= k <= last:
                assert fraction > 0.4 * area, (event, k, fraction)
            else:
                assert fraction < 0.02, (event, k, fraction)


def test_subsampling_keeps_true_timestamps(clip):
    spec, _, path = clip
    full = decode_video(path, image_size=64)
    sub = decode_video(path, image_size=64, max_frames=5)
    expected_seconds = np.round(np.linspace(0, spec.duration - 1, 5))
    np.testing.assert_array_equal(sub.frame_times, expected_seconds)
    np.testing.assert_array_equal(sub.frames, full.frames[expected_seconds.astype(int)])
    # An event maps to the subsampled frames nearest to its ends.
    for event in spec.events:
        first, last = seconds_to_frame_interval(event.start, event.end, sub.frame_times)
        assert abs(sub.frame_times[first] - event.start) <= (
            np.abs(sub.frame_times - event.start).min() + 1e-6)
        assert abs(sub.frame_times[last] - event.end) <= (
            np.abs(sub.frame_times - event.end).min() + 1e-6)


def test_other_fps_and_resize(clip):
    spec, rendered, path = clip
    half_second = decode_video(path, fps=2.0, image_size=64)
    np.testing.assert_array_equal(half_second.frame_times, np.arange(2 * spec.duration) / 2)
    errors = np.abs(half_second.frames.astype(np.int32) - rendered[::2].astype(np.int32))
    assert errors.mean(axis=(1, 2, 3)).max() < MEAN_ABS_TOLERANCE
    big = decode_video(path, image_size=96, max_frames=3)
    assert big.frames.shape == (3, 96, 96, 3)
    # Upscaling preserves the mean colour of each frame closely.
    small_means = decode_video(path, image_size=64, max_frames=3).frames.mean(axis=(1, 2))
    np.testing.assert_allclose(big.frames.mean(axis=(1, 2)), small_means, atol=1.5)


@pytest.mark.parametrize("height, width", [(360, 640), (100, 50), (48, 80), (64, 64)])
def test_resize_matches_torch_antialiased_bilinear(height, width):
    import torch  # the test extra: never skip
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3),
                                                           dtype=np.uint8)
    size = 32
    ours = resize_center_crop(image, size)
    short, long = min(height, width), max(height, width)
    long_out = int(size * long / short)
    target = (size, long_out) if height <= width else (long_out, size)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].double(), size=target,
        mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    offset = (long_out - size) // 2
    ref = ref[:, offset:offset + size] if height <= width else ref[offset:offset + size]
    ref = np.clip(np.rint(ref), 0, 255)
    assert ours.shape == (size, size, 3)
    # float32 (ours) vs float64 (reference) may round a .5 the other way: at most 1 level.
    assert np.abs(ours.astype(np.float64) - ref).max() <= 1.0
    np.testing.assert_allclose(antialias_bilinear_weights(7, 7), np.eye(7))


def test_seconds_to_frame_interval():
    one_fps = np.arange(10, dtype=np.float32)
    assert seconds_to_frame_interval(3.0, 7.4, one_fps) == (3, 7)
    assert seconds_to_frame_interval(3.6, 7.5, one_fps) == (4, 8)     # round half to even
    assert seconds_to_frame_interval(7.4, 3.0, one_fps) == (3, 7)     # swapped
    assert seconds_to_frame_interval(-2.0, 42.0, one_fps) == (0, 9)   # clipped
    assert seconds_to_frame_interval(12.0, 15.0, one_fps) == (9, 9)
    uneven = np.array([0.0, 2.0, 6.0, 10.0])
    assert seconds_to_frame_interval(1.2, 7.0, uneven) == (1, 2)
    assert seconds_to_frame_interval(0.9, 9.0, uneven) == (0, 3)
    assert seconds_to_frame_interval(5.0, 5.0, np.array([4.0])) == (0, 0)
    with pytest.raises(ValueError):
        seconds_to_frame_interval(0.0, 1.0, np.zeros((0,)))


# ---------------------------------------------------------------------------- errors


def _assert_error(path, error_type, fragment, **kwargs):
    with pytest.raises(error_type) as info:
        decode_video(path, image_size=32, **kwargs)
    assert isinstance(info.value, VideoError)
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert info.value.path == str(path)


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "nope.mp4", VideoNotFoundError, "file not found")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _assert_error(path, CorruptVideoError, "cannot open")


def test_zero_length_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    _assert_error(path, EmptyVideoError, "0 bytes")


def test_truncated_mp4(clip, tmp_path):
    data = open(clip[2], "rb").read()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])         # index (moov) at the end: unreadable
    _assert_error(path, CorruptVideoError, "cannot open as a video container")


def test_truncated_faststart_mp4(clip, tmp_path):
    """Index first (faststart): opens fine, then the frame data runs out mid-stream."""
    source = tmp_path / "faststart.mp4"
    with av.open(str(source), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=4, options={"threads": "1"})
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for j, image in enumerate(clip[1]):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = j, fractions.Fraction(1, 4)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = source.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    path = tmp_path / "truncated_faststart.mp4"
    path.write_bytes(data[: int(len(data) * 0.6)])
    _assert_error(path, CorruptVideoError, "decoding failed after")


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    _assert_error(path, CorruptVideoError, "no video stream")


def test_duration_limits(clip):
    spec, _, path = clip
    _assert_error(path, VideoTooShortError, f"duration {spec.duration:.3f} s is shorter",
                  min_duration=spec.duration + 5)
    _assert_error(path, VideoTooLongError, "longer than max_duration 5",
                  max_duration=5)
    assert decode_video(path, image_size=32, min_duration=spec.duration - 1,
                        max_duration=spec.duration + 1).frames.shape[0] == spec.duration


def test_bad_arguments(clip):
    with pytest.raises(ValueError):
        decode_video(clip[2], fps=0)
    assert os.path.exists(clip[2])


def _write(path, frames, *, container_format=None, codec="libx264", options=None):
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=4, options=options or {})
        stream.width = stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for j, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = j, fractions.Fraction(1, 4)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_other_containers_and_codec(clip, tmp_path):
    """Matroska (millisecond time base) and AVI with MPEG-4 part 2: same sampling times."""
    spec, rendered, _ = clip
    mkv = tmp_path / "clip.mkv"
    _write(mkv, rendered, options={"crf": str(SETTINGS.crf), "threads": "1"})
    decoded = decode_video(mkv, image_size=64)
    np.testing.assert_array_equal(decoded.frame_times, np.arange(spec.duration))
    errors = np.abs(decoded.frames.astype(np.int32) - rendered[::4].astype(np.int32))
    assert errors.mean(axis=(1, 2, 3)).max() < MEAN_ABS_TOLERANCE
    avi = tmp_path / "clip.avi"
    _write(avi, rendered, codec="mpeg4")       # default bitrate: lossier, times only
    decoded = decode_video(avi, image_size=64, fps=2.0)
    np.testing.assert_array_equal(decoded.frame_times, np.arange(2 * spec.duration) / 2)
    assert decoded.duration == pytest.approx(spec.duration)


def test_raw_elementary_stream_is_rejected(clip, tmp_path):
    path = tmp_path / "clip.h264"
    _write(path, clip[1][:8], container_format="h264", options={"threads": "1"})
    _assert_error(path, CorruptVideoError, "cannot determine the duration")
