"""From files to model inputs: decode videos and images to upright uint8 RGB frames
sampled uniformly in time (`video`), normalise them as the vision tower expects
(`image_processing`), turn conversations into token ids and labels (`processor`), and
read LLaVA-format datasets and mixtures (`dataset`). PyAV and PIL only: no torchvision,
no ffmpeg binary."""

from crosslmm.data.dataset import DataCollator, LengthGroupedSampler, LLaVADataset, load_mixture, load_records
from crosslmm.data.image_processing import FrameProcessor
from crosslmm.data.processor import CrossLMMProcessor, RecordError
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
    "CrossLMMProcessor",
    "DataCollator",
    "FrameProcessor",
    "LLaVADataset",
    "LengthGroupedSampler",
    "RecordError",
    "load_mixture",
    "load_records",
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
