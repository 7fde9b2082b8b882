"""Video and image decoding into uint8 RGB frame stacks (PyAV and PIL only).

Frames are chosen by presentation time, not by frame index: in a variable-frame-rate
video (phone recordings, screen captures) index-uniform sampling over-samples the busy
stretches, so "8 frames" would not mean "8 moments spread over the video".

A video is read twice, but decoded once:

1. an index pass demuxes the video packets without decoding them, to learn the exact
   presentation span (first timestamp to end of the last frame) and the frame count.
   Container metadata is not trusted for this: an MP4 with B-frames and irregular
   timestamps reports a duration computed from decode timestamps, which can be far
   shorter than the real one (seen with libx264 output: 1.05 s reported for 1.63 s).
2. a decode pass streams frames in presentation order and keeps, for every target
   time, the frame on screen at that moment; only the chosen frames are converted to
   RGB arrays, so memory holds the selected frames plus one pending frame, never the
   whole video. Decoding stops once every target has its frame.

Rule for "the frame on screen at t": the last frame whose timestamp is <= t (the first
frame for targets before it). With segment-centre targets this picks exactly the frames
of `sample_frame_indices` on constant-frame-rate video.
"""

from __future__ import annotations

import math
import os
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
from av.sidedata.sidedata import Type as SideDataType
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_FRAMES = 32
# Used only when a stream states no frame rate and has no timestamps (raw elementary
# streams): ffmpeg assumes the same rate, and any constant keeps sampling uniform.
_FALLBACK_RATE = Fraction(25)
# Formats PIL is asked to recognise when sniffing content: still-image formats with a
# magic number. Left to itself PIL also "recognises" MPEG-1 video headers, and TGA has
# no magic number at all, so either could claim a video.
_STILL_IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF", "PPM", "ICO", "AVIF", "JPEG2000")
_ANIMATABLE_FORMATS = {"GIF", "PNG", "WEBP", "AVIF"}

MediaPath = str | os.PathLike


class VideoDecodeError(ValueError):
    """The file exists but holds no decodable video (or image) frames."""


@dataclass
class VideoClip:
    """Frames chosen from one video or image, with where they sit in time.

    `frames` always has `num_requested` entries for videos sampled by count; when the
    video has fewer distinct frames than that, frames repeat and `num_unique` says how
    many distinct source frames there are. `frame_indices` are the chosen frames' places
    in presentation order (0 = first frame of the file), so callers and tests can tell
    which frames were picked.
    """

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, upright
    timestamps: list[float]  # seconds from the start of the video stream
    duration: float  # seconds, first timestamp to the end of the last frame
    source_fps: float | None  # the file's frames per second over its span (average for VFR)
    num_requested: int
    num_unique: int
    frame_indices: list[int]
    path: str

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


# --------------------------------------------------------------------------- sampling


def sample_frame_indices(num_frames_in_video: int, num_frames: int) -> list[int]:
    """Index of the centre frame of each of `num_frames` equal segments.

    For callers that already hold decoded frames (or trust a constant frame rate).
    With fewer frames than requested, indices repeat rather than fail, matching the
    short-video policy of `load_video`.
    """
    if num_frames_in_video < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames_in_video={num_frames_in_video}")
    _check_count(num_frames, "num_frames")
    return [(2 * i + 1) * num_frames_in_video // (2 * num_frames) for i in range(num_frames)]


def sample_times(start: float | Fraction, end: float | Fraction, num_frames: int) -> list:
    """Centres of `num_frames` equal segments of [start, end).

    Centres rather than edges: both ends of a video are often black or a title card, and
    centres space the samples evenly including the gaps at either end. Works on floats or
    Fractions (the decoder uses Fractions so that no timestamp equality is lost to rounding).
    """
    _check_count(num_frames, "num_frames")
    span = end - start
    return [start + span * (2 * i + 1) / (2 * num_frames) for i in range(num_frames)]


def count_for_fps(duration: float, fps: float, max_frames: int, available: int | None = None) -> int:
    """How many frames sampling at `fps` gives, capped by `max_frames` and by the frames
    that exist (sampling faster than the source only repeats frames), and at least one."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _check_count(max_frames, "max_frames")
    count = max(1, math.floor(float(duration) * fps + 0.5))
    if available is not None:
        count = min(count, max(1, available))
    return min(count, max_frames)


def select_frames(frame_times: Sequence, targets: Sequence) -> list[int]:
    """For each target time, the index of the frame on screen then (last frame with
    time <= target; the first frame for targets before it). `frame_times` must be sorted.

    This is the rule the streaming decoder applies; exposed for callers with a frame list.
    """
    if not frame_times:
        raise ValueError("no frame times to select from")
    return [max(0, bisect_right(frame_times, t) - 1) for t in targets]


def _check_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- orientation


def apply_display_matrix(frames: np.ndarray, matrix: Sequence[int] | None) -> np.ndarray:
    """Turn decoded (..., H, W, C) pixels upright as a player would show them.

    `matrix` is FFmpeg's 3x3 display matrix (9 int32, 16.16 fixed point, row-major).
    It maps a source point (x, y), centred with y pointing down, to
    (a*x + c*y, b*x + d*y) where (a, b, c, d) = matrix[0, 1, 3, 4]. For the eight
    rotations/flips a container can state this is a signed permutation, applied here as
    an optional transpose plus flips (checked against `ffmpeg` autorotate for all eight).
    Other angles are snapped to the nearest quarter turn: a ViT input has no use for
    rotated, letterboxed pixels.
    """
    if matrix is None:
        return frames
    a, b, _, c, d = (float(v) for v in matrix[:5])
    rows, cols = frames.ndim - 3, frames.ndim - 2
    if abs(b) + abs(c) > abs(a) + abs(d):  # a quarter turn: source columns become rows
        frames = np.swapaxes(frames, rows, cols)
        flip_cols, flip_rows = c < 0, b < 0
    else:
        flip_cols, flip_rows = a < 0, d < 0
    if flip_rows:
        frames = np.flip(frames, axis=rows)
    if flip_cols:
        frames = np.flip(frames, axis=cols)
    return np.ascontiguousarray(frames)


def display_matrix(frame: av.VideoFrame) -> list[int] | None:
    """The frame's display matrix side data (copied from the container), if any."""
    side_data = frame.side_data.get(SideDataType.DISPLAYMATRIX)
    if side_data is None:
        return None
    values = np.frombuffer(bytes(side_data), dtype=np.int32)
    return values.tolist() if values.size == 9 else None


# --------------------------------------------------------------------------- loading


def load_video(
    path: MediaPath,
    num_frames: int | None = None,
    *,
    fps: float | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> VideoClip:
    """Decode frames spread uniformly in time over the whole video.

    Modes: `num_frames=N` gives exactly N frames at segment centres; `fps=r` gives one
    frame per 1/r seconds (again at segment centres), at most `max_frames` and at most
    the number of frames the video has; neither gives `max_frames` frames uniformly.

    Short videos: with fewer decodable frames than requested, each target still gets
    the frame on screen at its time, so frames repeat and exactly the requested count
    comes back (models batch on a fixed count); `num_unique` tells callers how many
    distinct frames there are. The frames are upright (display matrix applied) and all
    have the size of the first decoded frame (a stream that changes resolution midway
    is rescaled to it).

    Raises FileNotFoundError for a missing path and VideoDecodeError for a file that
    FFmpeg cannot open, that has no video stream, or that yields no frame. Packets that
    fail to decode after the file opened are skipped with a warning, as ffmpeg does, so
    a truncated download still gives the frames it holds.
    """
    path = _existing_file(path)
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is not None:
        _check_count(num_frames, "num_frames")
    _check_count(max_frames, "max_frames")
    try:
        index = _index_video(path)
        if fps is not None:
            num_frames = count_for_fps(index.end - index.start, fps, max_frames, index.num_packets)
        picker = _Picker(sample_times(index.start, index.end, num_frames or max_frames))
        _decode_into(picker, path, index)
    except av.FFmpegError as err:
        if isinstance(err, PermissionError):
            raise
        raise VideoDecodeError(f"cannot decode video {path}: {err}") from err
    return picker.clip(path, index)


def load_image(path: MediaPath) -> VideoClip:
    """Load a still image as a one-frame clip, upright (EXIF orientation applied).

    Transparency is composited on white, as transformers' image processors do, so a
    transparent PNG looks the same here as through the checkpoint's own processor.
    """
    path = _existing_file(path)
    try:
        with Image.open(path) as image:
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except PermissionError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        raise VideoDecodeError(f"cannot decode image {path}: {err}") from err
    return still_clip(rgb, str(path))


def still_clip(rgb: np.ndarray, path: str = "<image>") -> VideoClip:
    """An (H, W, 3) uint8 image as a one-frame clip (CrossLMM's image is a 1-frame video)."""
    return VideoClip(
        frames=rgb[None], timestamps=[0.0], duration=0.0, source_fps=None,
        num_requested=1, num_unique=1, frame_indices=[0], path=path,
    )


def load_media(
    path: MediaPath,
    num_frames: int | None = None,
    *,
    fps: float | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> VideoClip:
    """Load a still image (one frame, sampling arguments ignored) or a video.

    Decided by content, never by the file name: PIL is asked whether the bytes are a
    still image; anything else, animated GIF/PNG/WebP included, goes to the video decoder.
    """
    path = _existing_file(path)
    if _is_still_image(path):
        return load_image(path)
    return load_video(path, num_frames, fps=fps, max_frames=max_frames)


def _existing_file(path: MediaPath) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "no such media file", str(path))
    if path.is_dir():
        raise IsADirectoryError(21, "expected a media file, got a directory", str(path))
    return path


def _is_still_image(path: Path) -> bool:
    Image.init()
    formats = [name for name in _STILL_IMAGE_FORMATS if name in Image.OPEN]
    try:
        with Image.open(path, formats=formats) as image:
            return not (image.format in _ANIMATABLE_FORMATS and getattr(image, "is_animated", False))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        return False


def _to_rgb(image: Image.Image) -> np.ndarray:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


# --------------------------------------------------------------------------- index pass


@dataclass(frozen=True)
class _Index:
    """What the demuxer says about the video stream, before any decoding."""

    start: Fraction  # seconds
    end: Fraction  # seconds, end of the last frame
    num_packets: int
    rate: Fraction  # frames per second to synthesise timestamps for frames that lack one
    pts: tuple[int, ...] = ()  # sorted packet timestamps (stream time base): frame positions
    keyframes: tuple[int, ...] = ()  # sorted timestamps of keyframe packets: where decoding can start
    time_base: Fraction = Fraction(1, 1)

    def seek_point(self, target: Fraction, decoded_pts: int | None) -> int | None:
        """The keyframe to seek to for the frame on screen at `target` seconds, when it
        lies more than `SEEK_MIN_GAP` frames past the last decoded frame (`decoded_pts`,
        None before the first); None: decoding on is cheaper than seeking (or the file
        has no usable timestamps or keyframe flags)."""
        if not self.pts or not self.keyframes:
            return None
        wanted = bisect_right(self.pts, math.floor(target / self.time_base)) - 1  # the frame on screen then
        if wanted < 0:
            return None
        keyframe = self.keyframes[max(bisect_right(self.keyframes, self.pts[wanted]) - 1, 0)]
        done = -1 if decoded_pts is None else bisect_right(self.pts, decoded_pts) - 1
        ahead = bisect_left(self.pts, keyframe) - done
        return keyframe if ahead > SEEK_MIN_GAP else None

    def position(self, frame: av.VideoFrame, ordinal: int) -> int:
        """The frame's index in presentation order among all frames of the file, so a
        frame the decoder drops does not shift the indices after it; the decode
        ordinal when the frame cannot be placed."""
        if frame.pts is not None and self.pts:
            i = bisect_left(self.pts, frame.pts)
            if i < len(self.pts) and self.pts[i] == frame.pts:
                return i
        return ordinal


def _index_video(path: Path) -> _Index:
    """Exact presentation span from packet timestamps (not decoded, just demuxed)."""
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        time_base = stream.time_base or Fraction(1, 1)
        rate = stream.guessed_rate or stream.average_rate or _FALLBACK_RATE
        spans, keyframes = [], []
        num_packets = 0
        for packet in _packets(container, stream, path):
            if packet.size == 0:
                continue
            num_packets += 1
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is not None:
                spans.append((pts, packet.duration or 0))
                if packet.is_keyframe:
                    keyframes.append(pts)
    if num_packets == 0:
        raise VideoDecodeError(f"cannot decode video {path}: the video stream has no packets")
    if not spans:  # raw elementary stream: frames are timed by their order
        return _Index(Fraction(0), num_packets / rate, num_packets, rate)
    spans.sort()
    pts = tuple(p for p, _ in spans)
    last, last_duration = spans[-1]
    if not last_duration:  # the muxer did not say: assume the typical frame gap
        last_duration = _typical_gap(pts) or (1 / rate) / time_base
    return _Index(pts[0] * time_base, (last + last_duration) * time_base, num_packets, rate, pts,
                  tuple(sorted(keyframes)), Fraction(time_base))


def _typical_gap(sorted_pts: Sequence[int]) -> int | None:
    gaps = [b - a for a, b in pairwise(sorted_pts) if b > a]
    return sorted(gaps)[len(gaps) // 2] if gaps else None


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoDecodeError(f"cannot decode video {path}: the file has no video stream")
    return container.streams.video[0]


def _packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path):
    """Demuxed packets of `stream`; a read error ends the stream (with a warning) instead
    of discarding the frames read so far."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError as err:
            warnings.warn(f"{path}: stopped reading at a damaged packet: {err}", RuntimeWarning, stacklevel=2)
            return
        yield packet


# --------------------------------------------------------------------------- decode pass


# Frames between two targets that are decoded rather than sought over: a seek costs a
# demuxer jump and decoding from the keyframe before the target, a few dozen frames in a
# typical GOP; below this gap decoding straight on is as fast.
SEEK_MIN_GAP = 48


def _decode_into(picker: _Picker, path: Path, index: _Index, seek: bool = True) -> None:
    """Offer frames to the picker in presentation order until every target is settled.
    With `seek`, a target far past the last decoded frame is reached by seeking to the
    keyframe before the frame on screen at it, so a long video sampled uniformly costs
    about (targets x GOP) decoded frames instead of all of them. The picker sees the
    same frames at and around each target either way: the skipped ones are never on
    screen at a target (the test decodes both ways and compares)."""
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        decoded_pts = None
        while True:
            target = picker.targets[picker.next_target] if picker.next_target < len(picker.targets) else None
            jump = index.seek_point(target, decoded_pts) if seek and target is not None else None
            if jump is not None:
                container.seek(jump, stream=stream, backward=True, any_frame=False)
            # PyAV's default slice threading, not "AUTO": frame threading hides decode errors
            # and dropped the last good frames of a truncated file in testing.
            with closing(_decoded_frames(container, stream, path)) as frames:
                for frame in frames:
                    decoded_pts = frame.pts if frame.pts is not None else decoded_pts
                    if picker.offer(frame, index):
                        return
                    upcoming = picker.targets[picker.next_target]
                    if seek and decoded_pts is not None and index.seek_point(upcoming, decoded_pts) is not None:
                        break  # far to the next target: seek instead of decoding the gap
                else:
                    return  # the end of the file


def _decoded_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path):
    """Frames in presentation order. A packet the decoder rejects is skipped, as the
    ffmpeg command line does; the count is reported once, when decoding ends."""
    skipped = 0
    try:
        for packet in _packets(container, stream, path):
            try:
                frames = stream.decode(packet)
            except av.FFmpegError:
                skipped += 1
                continue
            yield from frames
    finally:
        if skipped:
            warnings.warn(f"{path}: skipped {skipped} undecodable video packet(s)", RuntimeWarning, stacklevel=2)


class _Picker:
    """Consumes frames in presentation order and keeps, for each target time, the frame
    on screen then: a frame is settled once the next frame starts after the target.
    Holds the chosen RGB arrays plus one pending frame."""

    def __init__(self, targets: list[Fraction]) -> None:
        self.targets = targets
        self.next_target = 0
        self.choice: list[int] = []  # frame position per settled target
        self.kept: dict[int, tuple[np.ndarray, Fraction]] = {}
        self.pending: tuple[int, av.VideoFrame, Fraction] | None = None  # (position, frame, time)
        self.decoded = 0
        self.size: tuple[int, int] | None = None  # (width, height) of the first frame
        self.matrix: list[int] | None = None

    def offer(self, frame: av.VideoFrame, index: _Index) -> bool:
        """Take the next decoded frame; True once every target has its frame."""
        if self.size is None:
            self.size = (frame.width, frame.height)
            self.matrix = display_matrix(frame)
        entry = (index.position(frame, self.decoded), frame, self._time_of(frame, index))
        self.decoded += 1
        while self.next_target < len(self.targets) and self.targets[self.next_target] < entry[2]:
            self._settle(self.pending or entry)
        self.pending = entry
        return self.next_target == len(self.targets)

    def clip(self, path: Path, index: _Index) -> VideoClip:
        if self.pending is None:
            raise VideoDecodeError(f"cannot decode video {path}: no frame could be decoded")
        while self.next_target < len(self.targets):
            self._settle(self.pending)
        frames = np.stack([self.kept[i][0] for i in self.choice])
        span = index.end - index.start
        return VideoClip(
            frames=apply_display_matrix(frames, self.matrix),
            timestamps=[float(self.kept[i][1] - index.start) for i in self.choice],
            duration=float(span),
            source_fps=float(index.num_packets / span) if span > 0 else float(index.rate),
            num_requested=len(self.targets),
            num_unique=len(self.kept),
            frame_indices=list(self.choice),
            path=str(path),
        )

    def _time_of(self, frame: av.VideoFrame, index: _Index) -> Fraction:
        """Presentation time; frames without one follow the previous frame by 1/rate.
        Times never go backwards, so a glitch cannot reorder the selection."""
        previous = self.pending[2] if self.pending else None
        if frame.pts is not None and frame.time_base is not None:
            time = frame.pts * frame.time_base
        else:
            time = index.start if previous is None else previous + 1 / index.rate
        return time if previous is None else max(time, previous)

    def _settle(self, entry: tuple[int, av.VideoFrame, Fraction]) -> None:
        position, frame, time = entry
        if position not in self.kept:
            width, height = self.size
            self.kept[position] = (frame.to_ndarray(format="rgb24", width=width, height=height), time)
        self.choice.append(position)
        self.next_target += 1
