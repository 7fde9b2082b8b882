"""Uniform sampling of a long video with and without seeking (docs/training.md, "Long videos").

    python3 tools/bench_seek.py [PATH]    # default: writes a 3-minute 640x360 H.264 file to /tmp/seek/long.mp4
"""

from __future__ import annotations

import os
import sys
import time

import av
import numpy as np

from crosslmm.data import video


def write_long_video(path: str, frames: int = 5400, width: int = 640, height: int = 360) -> None:
    """A scrolling noise texture at 30 fps, x264's default keyframe interval."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    base = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.roll(base, i * 3, axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/seek/long.mp4"
    if not os.path.exists(path):
        write_long_video(path)
    index = video._index_video(video.Path(path))
    print(f"{path}: {len(index.pts)} frames, {len(index.keyframes)} keyframes")
    default = video.SEEK_MIN_GAP
    for num_frames in (16, 64):
        for gap, name in ((default, "seek"), (10**9, "decode every frame")):
            video.SEEK_MIN_GAP = gap
            started = time.perf_counter()
            video.load_video(path, num_frames=num_frames)
            print(f"{num_frames} frames, {name}: {time.perf_counter() - started:.2f} s")
        video.SEEK_MIN_GAP = default


if __name__ == "__main__":
    main()
