"""Media input: decode videos and images to upright uint8 RGB frames sampled uniformly in
time (`video`), and turn frames into the normalised pixel values a SigLIP/CLIP tower
expects (`image_processing`). PyAV and PIL only: no torchvision, no ffmpeg binary."""

from crosslmm.data.image_processing import FrameProcessor
from crosslmm.data.video import (
    DEFAULT_MAX_FRAMES,
    VideoClip,
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

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "FrameProcessor",
    "VideoClip",
    "VideoDecodeError",
    "apply_display_matrix",
    "count_for_fps",
    "load_image",
    "load_media",
    "load_video",
    "sample_frame_indices",
    "sample_times",
    "select_frames",
]
