"""VideoMME's subtitles as lmms-eval v0.3.3 put them in the prompt.

The .srt is cut into cues on blank lines; a cue's times become frame numbers at the
video's frame rate (truncated); 32 frame indices are spread evenly over the video
(`linspace(0, total_frames - 1, 32)`, truncated); a cue is kept when one of them lies in
[start frame, end frame); from each kept cue only the text inside the first
`<font color="white" size=".72c">...</font>` survives (a cue without it is dropped).

One difference, on purpose: lmms-eval collects the kept cues through a Python set, so
their order is the set's, not the video's; here they stay in time order.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

NO_SUBTITLES = "No subtitles available"
SUBTITLE_FRAMES = 32
_FONT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """(start s, end s, text) per cue, text lines joined with spaces. A later cue with
    the same start and end replaces the earlier one (lmms-eval keys cues by their times)."""
    cues: dict[tuple[float, float], str] = {}
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = block.split("\n")
        if not block.strip() or len(lines) < 3:
            continue
        start, end = (_seconds(part.strip()) for part in lines[1].split(" --> "))
        cues[(start, end)] = " ".join(lines[2:])
    return [(start, end, text) for (start, end), text in cues.items()]


def sampled_subtitles(video: str | Path, srt: str | Path, frames: int = SUBTITLE_FRAMES) -> str:
    """The subtitle block of VideoMME's prompt; `NO_SUBTITLES` without an .srt file.
    Raises FileNotFoundError or av.FFmpegError when the video cannot be opened (the
    frame rate and count are the video's)."""
    srt = Path(srt)
    if not srt.is_file():
        return NO_SUBTITLES
    fps, total = video_frame_rate_and_count(video)
    indices = np.linspace(0, total - 1, frames, dtype=int).tolist()
    kept = []
    for start, end, text in sorted(parse_srt(srt.read_text(encoding="utf-8"))):
        first, last = int(start * fps), int(end * fps)
        if any(first <= index < last for index in indices):
            match = _FONT.search(text)
            if match:
                kept.append(match.group(1))
    return "\n".join(kept)


def video_frame_rate_and_count(video: str | Path) -> tuple[float, int]:
    """Frames per second and the frame count the container declares (what OpenCV's
    CAP_PROP_FPS and CAP_PROP_FRAME_COUNT read), estimated from the duration when the
    container does not declare a count."""
    if not Path(video).is_file():
        raise FileNotFoundError(2, "video not found", str(video))
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        total = stream.frames
        if not total and stream.duration is not None and stream.time_base is not None:
            total = int(float(stream.duration * stream.time_base) * float(rate))
    return float(rate), int(total)


def _seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.split(":")
    seconds, millis = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000
