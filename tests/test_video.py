"""Media input: real files written with PyAV/PIL into tmp_path, then read back.

Every video frame i is a solid grey level 16 + 20 * i, so a test can read back WHICH
source frame was sampled (lossy codecs move the level by a few units, not by 20).
Timestamps are written in milliseconds, so variable frame rate is just irregular pts.
"""

from __future__ import annotations

import json
import os
import re
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

from crosslmm.data import (
    FrameProcessor,
    VideoDecodeError,
    apply_display_matrix,
    count_for_fps,
    load_image,
    load_media,
    load_video,
    sample_frame_indices,
    sample_times,
    select_frames,
)

MS = Fraction(1, 1000)
CFR_12 = [100 * i for i in range(12)]  # 12 frames at 10 fps: 1.2 s


def level(i: int) -> int:
    return 16 + 20 * i


def grey_frame(i: int, width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), level(i), dtype=np.uint8)


def noisy_frame(i: int, width: int, height: int) -> np.ndarray:
    """Grey level on top, noise below: large packets of similar size, so a cut file
    loses frames in proportion to the bytes cut."""
    frame = grey_frame(i, width, height)
    frame[height // 2:] = np.random.default_rng(i).integers(0, 256, (height - height // 2, width, 3), dtype=np.uint8)
    return frame


def corner_frame(i: int, width: int, height: int) -> np.ndarray:
    """Dark frame, bright top-left block, red bar along the top edge: no symmetry, so
    any rotation or flip is visible."""
    frame = np.full((height, width, 3), 30, dtype=np.uint8)
    frame[: height // 2, : width // 2] = 230
    frame[:2, :, 0] = 230
    return frame


def write_video(path, times_ms, *, codec="libx264", size=(32, 24), pix_fmt="yuv420p", frame=grey_frame,
                rotation=None, hflip=False, vflip=False, options=None):
    """Encode one frame per timestamp (ms); rate=10 only sets the last frame's duration."""
    width, height = size
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = MS
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        for i, pts in enumerate(times_ms):
            video_frame = av.VideoFrame.from_ndarray(frame(i, width, height), format="rgb24")
            video_frame.pts, video_frame.time_base = pts, MS
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


def source_indices(clip) -> list[int]:
    """Which source frame each returned frame shows, read from its grey level."""
    return [round((float(f[: f.shape[0] // 2].mean()) - 16) / 20) for f in clip.frames]


def needs(codec: str):
    return pytest.mark.skipif(codec not in av.codecs_available, reason=f"{codec} not in this PyAV build")


CONTAINERS = [
    pytest.param("mp4", "libx264", marks=needs("libx264"), id="mp4-h264"),
    pytest.param("webm", "libvpx", marks=needs("libvpx"), id="webm-vp8"),
    pytest.param("webm", "libvpx-vp9", marks=needs("libvpx-vp9"), id="webm-vp9"),
    pytest.param("mkv", "mpeg4", marks=needs("mpeg4"), id="mkv-mpeg4"),
]


# --------------------------------------------------------------------------- sampling helpers


def test_index_sampling_takes_segment_centres_and_repeats_when_short():
    assert sample_frame_indices(10, 5) == [1, 3, 5, 7, 9]
    assert sample_frame_indices(12, 4) == [1, 4, 7, 10]
    assert sample_frame_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert sample_frame_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 3)
    with pytest.raises(ValueError):
        sample_frame_indices(5, 0)


def test_time_sampling_picks_the_frame_on_screen():
    assert sample_times(Fraction(0), Fraction(2), 4) == [Fraction(1, 4), Fraction(3, 4), Fraction(5, 4), Fraction(7, 4)]
    times = [0.0, 0.1, 0.2, 1.0]
    assert select_frames(times, [-1.0, 0.0, 0.15, 0.99, 1.0, 5.0]) == [0, 0, 1, 2, 3, 3]
    # On constant-rate frames, time sampling agrees with index sampling.
    cfr = [Fraction(i, 10) for i in range(12)]
    assert select_frames(cfr, sample_times(Fraction(0), Fraction(12, 10), 4)) == sample_frame_indices(12, 4)
    assert count_for_fps(10.0, 1.0, max_frames=64) == 10
    assert count_for_fps(10.0, 1.0, max_frames=4) == 4
    assert count_for_fps(1.0, 30.0, max_frames=64, available=10) == 10
    assert count_for_fps(0.01, 1.0, max_frames=64) == 1


# --------------------------------------------------------------------------- containers


@pytest.mark.parametrize("extension, codec", CONTAINERS)
def test_containers_sample_uniformly(tmp_path, extension, codec):
    path = write_video(tmp_path / f"clip.{extension}", CFR_12, codec=codec)
    clip = load_video(path, 4)
    assert clip.frames.shape == (4, 24, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.frame_indices == sample_frame_indices(12, 4) == [1, 4, 7, 10]
    assert source_indices(clip) == [1, 4, 7, 10]
    assert clip.timestamps == pytest.approx([0.1, 0.4, 0.7, 1.0])
    assert clip.duration == pytest.approx(1.2)
    assert clip.source_fps == pytest.approx(10.0)
    assert (clip.num_requested, clip.num_unique) == (4, 4)


@needs("libx264")
def test_fps_mode_and_default(tmp_path):
    path = write_video(tmp_path / "clip.mp4", CFR_12)
    clip = load_video(path, fps=2.5)  # 1.2 s * 2.5 = 3 frames, at 0.2, 0.6, 1.0 s
    assert source_indices(clip) == clip.frame_indices == [2, 6, 10]
    assert load_video(path, fps=2.5, max_frames=2).frame_indices == [3, 9]
    assert load_video(path, fps=100.0).frame_indices == list(range(12))  # capped at the frames there are
    assert load_video(path, max_frames=6).frame_indices == sample_frame_indices(12, 6)
    with pytest.raises(ValueError, match="not both"):
        load_video(path, 4, fps=1.0)


# --------------------------------------------------------------------------- variable frame rate


@pytest.mark.parametrize("extension", [pytest.param("mp4", id="mp4"), pytest.param("mkv", id="mkv")])
@needs("libx264")
def test_variable_frame_rate_is_sampled_uniformly_in_time(tmp_path, extension):
    # A burst of five frames in 80 ms, then one frame per second: 9 frames over 4.1 s.
    times_ms = [0, 20, 40, 60, 80, 1000, 2000, 3000, 4000]
    path = write_video(tmp_path / f"vfr.{extension}", times_ms)
    clip = load_video(path, 4)
    # Targets at 0.51, 1.54, 2.56, 3.59 s: the frames on screen then are 4 (shown from
    # 0.08 s), 5, 6 and 7. Index sampling would have spent two samples on the burst.
    assert clip.frame_indices == source_indices(clip) == [4, 5, 6, 7]
    assert clip.frame_indices != sample_frame_indices(len(times_ms), 4)
    assert clip.timestamps == pytest.approx([0.08, 1.0, 2.0, 3.0])
    assert clip.duration == pytest.approx(4.1, abs=0.07)  # from packet pts, not container metadata
    with av.open(str(path)) as container:
        reported = container.duration / 1e6
    if extension == "mp4":  # why metadata is not trusted: the MP4 muxer's duration comes from dts
        assert reported < 3.0


# --------------------------------------------------------------------------- geometry


MATRIX_CASES = [  # (rotation CCW, hflip, vflip) as PyAV's set_display_rotation defines them
    (0, False, False), (90, False, False), (180, False, False), (-90, False, False),
    (0, True, False), (0, False, True), (90, True, False), (90, False, True),
]


def expected_upright(stored: np.ndarray, rotation: int, hflip: bool, vflip: bool) -> np.ndarray:
    """PyAV's definition: rotate counter-clockwise, then mirror. (Cross-checked when this
    was written against the `ffmpeg` command line's autorotate for all eight cases.)"""
    upright = np.rot90(stored, rotation // 90)
    if hflip:
        upright = np.fliplr(upright)
    if vflip:
        upright = np.flipud(upright)
    return upright


@pytest.mark.parametrize("rotation, hflip, vflip", MATRIX_CASES)
@needs("libx264")
def test_display_matrix_is_applied(tmp_path, rotation, hflip, vflip):
    path = write_video(tmp_path / "rotated.mp4", [0, 100], size=(32, 24), pix_fmt="yuv444p", frame=corner_frame,
                       rotation=rotation, hflip=hflip, vflip=vflip, options={"qp": "0"})
    clip = load_video(path, 1)
    expected = expected_upright(corner_frame(0, 32, 24), rotation, hflip, vflip)
    assert clip.frames.shape[1:] == expected.shape
    assert np.abs(clip.frames[0].astype(int) - expected).max() <= 8


def test_display_matrix_helper_on_a_stack():
    stack = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    quarter_ccw = [0, -65536, 0, 65536, 0, 0, 0, 0, 1 << 30]  # what FFmpeg stores for +90 degrees
    assert np.array_equal(apply_display_matrix(stack, quarter_ccw), np.rot90(stack, 1, axes=(1, 2)))
    assert apply_display_matrix(stack, None) is stack


@pytest.mark.parametrize(
    "extension, codec, pix_fmt",
    [
        pytest.param("mp4", "libx264", "yuv444p", marks=needs("libx264"), id="mp4-h264-444"),
        pytest.param("mkv", "mpeg4", "yuv420p", marks=needs("mpeg4"), id="mkv-mpeg4-420"),
    ],
)
def test_odd_frame_size(tmp_path, extension, codec, pix_fmt):
    path = write_video(tmp_path / f"odd.{extension}", CFR_12[:6], codec=codec, size=(97, 61), pix_fmt=pix_fmt)
    clip = load_video(path, 3)
    assert clip.frames.shape == (3, 61, 97, 3)
    assert source_indices(clip) == [1, 3, 5]
    pixels = FrameProcessor.from_vision_config(28, "siglip_vision_model")(clip)
    assert pixels.shape == (3, 3, 28, 28)


# --------------------------------------------------------------------------- short videos


@pytest.mark.parametrize("frames_in_video", [1, 3])
@needs("libx264")
def test_short_video_repeats_frames_to_the_requested_count(tmp_path, frames_in_video):
    path = write_video(tmp_path / "short.mp4", CFR_12[:frames_in_video])
    clip = load_video(path, 8)
    assert clip.frames.shape[0] == clip.num_requested == 8
    assert clip.num_unique == frames_in_video
    assert clip.frame_indices == source_indices(clip) == sample_frame_indices(frames_in_video, 8)


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "clip.mp4"
    for loader in (load_video, load_image, load_media):
        with pytest.raises(FileNotFoundError, match=r"clip\.mp4"):
            loader(missing)


def test_random_bytes_and_empty_file(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    for path in (noise, empty):
        with pytest.raises(VideoDecodeError, match=re.escape(path.name)):
            load_video(path, 4)
        with pytest.raises(VideoDecodeError, match=re.escape(path.name)):
            load_media(path, 4)
        with pytest.raises(VideoDecodeError, match=re.escape(path.name)):
            load_image(path)


@needs("libx264")
def test_truncated_mp4(tmp_path):
    whole = write_video(tmp_path / "whole.mp4", CFR_12).read_bytes()
    # Index ('moov') at the end, as written by default: a cut file has none.
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(VideoDecodeError, match=r"cut\.mp4"):
        load_video(cut, 4)
    # Index first ('faststart'): the frames before the cut still decode, the damaged
    # packet is skipped with a warning, and indices still name the frames of the file.
    streamable = write_video(tmp_path / "streamable.mp4", CFR_12, frame=noisy_frame, options={"movflags": "faststart"})
    data = streamable.read_bytes()
    cut_streamable = tmp_path / "cut_streamable.mp4"
    cut_streamable.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.warns(RuntimeWarning, match="undecodable"):
        clip = load_video(cut_streamable, 4)
    assert clip.frames.shape[0] == 4
    assert source_indices(clip) == clip.frame_indices
    assert max(clip.frame_indices) < 11


def test_file_without_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        samples = (np.sin(np.arange(800) / 5) * 8000).astype(np.int16)[None]
        audio = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        audio.sample_rate = 8000
        container.mux(stream.encode(audio))
        container.mux(stream.encode())
    with pytest.raises(VideoDecodeError, match="no video stream"):
        load_video(path, 2)


# --------------------------------------------------------------------------- images


def test_png_is_a_one_frame_clip(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "still.png")
    for clip in (load_image(tmp_path / "still.png"), load_media(tmp_path / "still.png", 8)):
        assert clip.frames.shape == (1, 7, 13, 3)
        assert np.array_equal(clip.frames[0], pixels)
        assert (clip.timestamps, clip.num_requested, clip.num_unique) == ([0.0], 1, 1)


def test_transparent_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[0, 0] = (255, 0, 0, 255)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    frame = load_image(tmp_path / "alpha.png").frames[0]
    assert tuple(frame[0, 0]) == (255, 0, 0)
    assert tuple(frame[3, 3]) == (255, 255, 255)


def test_jpeg_exif_orientation_is_applied(tmp_path):
    stored = corner_frame(0, 40, 20)  # 40 wide, 20 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    clip = load_media(tmp_path / "photo.jpg")
    expected = np.rot90(stored, -1)
    assert clip.frames.shape == (1, 40, 20, 3)
    assert np.abs(clip.frames[0].astype(int) - expected).mean() < 6


@needs("libx264")
def test_media_dispatch_reads_content_not_names(tmp_path):
    Image.fromarray(grey_frame(2, 8, 6)).save(tmp_path / "image.png")
    os.replace(tmp_path / "image.png", tmp_path / "looks_like.mp4")
    assert load_media(tmp_path / "looks_like.mp4", 4).frames.shape == (1, 6, 8, 3)
    write_video(tmp_path / "video.mp4", CFR_12)
    os.replace(tmp_path / "video.mp4", tmp_path / "looks_like.png")
    assert load_media(tmp_path / "looks_like.png", 4).frame_indices == [1, 4, 7, 10]


def test_animated_gif_is_a_video(tmp_path):
    frames = [Image.fromarray(grey_frame(i, 8, 8)) for i in range(6)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    clip = load_media(tmp_path / "anim.gif", 3)
    assert clip.frame_indices == source_indices(clip) == [1, 3, 5]


# --------------------------------------------------------------------------- frame processor


@pytest.mark.parametrize("shape", [(37, 53), (64, 20), (16, 16)])
def test_processor_matches_transformers_siglip_exactly(shape):
    image = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    reference = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    expected = np.asarray(reference(image, return_tensors="np")["pixel_values"])
    ours = FrameProcessor.from_preprocessor_config(reference.to_dict())
    assert np.array_equal(ours(image).numpy(), expected)
    assert FrameProcessor.from_vision_config(32, "siglip") == ours


@pytest.mark.parametrize("shape", [(37, 53), (64, 20), (10, 12)])  # the last is smaller than the crop
def test_processor_matches_transformers_clip_exactly(shape):
    image = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
    reference = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    expected = np.asarray(reference(image, return_tensors="np")["pixel_values"])
    ours = FrameProcessor.from_preprocessor_config(reference.to_dict())
    assert np.array_equal(ours(image).numpy(), expected)
    assert FrameProcessor.from_vision_config(24, "clip_vision_model") == ours
    # Resize to 28 then crop 24 (ImageNet style) and a crop smaller than the resize both hold.
    reference = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24})
    expected = np.asarray(reference(image, return_tensors="np")["pixel_values"])
    assert np.array_equal(FrameProcessor.from_preprocessor_config(reference.to_dict())(image).numpy(), expected)


def test_processor_reads_a_saved_preprocessor_config(tmp_path):
    config = {  # as google/siglip-so400m-patch14-384 ships it
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"height": 384, "width": 384},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = FrameProcessor.from_preprocessor_config(tmp_path, image_size=384)
    assert processor == FrameProcessor.from_vision_config(384, "siglip_vision_model")
    clip_config = {  # an older openai/clip-vit-* layout: bare ints, feature extractor naming
        "crop_size": 224, "do_center_crop": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 224,
    }
    assert FrameProcessor.from_preprocessor_config(clip_config) == FrameProcessor.from_vision_config(224, "clip")
    with pytest.raises(ValueError, match="expects 336px"):
        FrameProcessor.from_preprocessor_config(config, image_size=336)
    naflex = {"image_processor_type": "Siglip2ImageProcessor", "patch_size": 16, "max_num_patches": 256}
    with pytest.raises(ValueError, match="pass image_size"):
        FrameProcessor.from_preprocessor_config(naflex)
    siglip2 = FrameProcessor.from_preprocessor_config(naflex, image_size=64)
    assert siglip2.output_size == 64 and siglip2.resample == Image.Resampling.BILINEAR
    with pytest.raises(ValueError, match="square"):
        FrameProcessor.from_preprocessor_config({**config, "size": {"height": 384, "width": 512}})


def test_processor_output_layout():
    frames = np.zeros((5, 9, 11, 3), dtype=np.uint8)
    frames[:, :, :, 0] = 255
    pixels = FrameProcessor.from_vision_config(8, "siglip")(frames)
    assert pixels.shape == (5, 3, 8, 8) and pixels.dtype.is_floating_point
    assert float(pixels[:, 0].min()) == 1.0 and float(pixels[:, 1:].max()) == -1.0
    with pytest.raises(ValueError, match="uint8"):
        FrameProcessor.from_vision_config(8, "siglip")(frames.astype(np.float32))


# --------------------------------------------------------------------------- seeking in long videos


def counter_frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame i's number in 10 bits, one 4-pixel-wide column per bit: readable after lossy coding."""
    frame = np.full((height, width, 3), 20, dtype=np.uint8)
    for bit in range(10):
        if i >> bit & 1:
            frame[:, bit * 4:bit * 4 + 4] = 235
    return frame


def counter_indices(clip) -> list[int]:
    return [sum(1 << bit for bit in range(10) if f[:, bit * 4:bit * 4 + 4].mean() > 128) for f in clip.frames]


@pytest.mark.parametrize("extension, codec, options", [
    pytest.param("mp4", "libx264", {"g": "25", "bf": "2"}, marks=needs("libx264"), id="mp4-h264-bframes"),
    pytest.param("mkv", "mpeg4", {"g": "25"}, marks=needs("mpeg4"), id="mkv-mpeg4"),
    pytest.param("webm", "libvpx-vp9", {"g": "25"}, marks=needs("libvpx-vp9"), id="webm-vp9"),
])
def test_a_long_video_is_sampled_by_seeking_to_the_same_frames(tmp_path, monkeypatch, extension, codec, options):
    from crosslmm.data import video

    path = tmp_path / f"long.{extension}"
    times_ms = [40 * i for i in range(600)]  # 24 s at 25 fps, a keyframe every second
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25, options=options)
        stream.width, stream.height, stream.pix_fmt = 48, 16, "yuv420p"
        stream.codec_context.time_base = MS
        for i, pts in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(counter_frame(i, 48, 16), format="rgb24")
            frame.pts, frame.time_base = pts, MS
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    decoded = []
    real_decode = video._decoded_frames

    def counting(*args):
        for frame in real_decode(*args):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(video, "_decoded_frames", counting)
    sought = load_video(path, 8)
    seeking_decodes = len(decoded)
    monkeypatch.setattr(video, "SEEK_MIN_GAP", 10**9)  # never seek: decode every frame up to the last target
    decoded.clear()
    straight = load_video(path, 8)
    assert counter_indices(sought) == sought.frame_indices == sample_frame_indices(600, 8)
    assert sought.frame_indices == straight.frame_indices and sought.timestamps == straight.timestamps
    assert np.array_equal(sought.frames, straight.frames)
    assert seeking_decodes < len(decoded) / 2  # it did skip most of the file
