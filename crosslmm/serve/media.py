"""Media for the server: which URLs it may read, within which limits, and a cache of
encoded videos.

A URL is one of: a `data:` URL (base64), a `file://` URL or a plain path, which must
resolve (symlinks followed) inside the operator's `--media-root`, or an `http(s)://` URL
whose host the operator allowed. Everything else is refused before a byte is read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import av
import torch


class MediaError(Exception):
    """A request's media cannot be used; `status` is the HTTP answer (400, 403, 413, 422)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class MediaLimits:
    max_bytes: int = 256 * 2**20  # one media file (a data: URL's decoded bytes, a file, a download)
    max_seconds: float = 3 * 3600.0  # a video's duration
    max_frames: int = 64  # the server's frame ceiling; a request may ask for fewer
    media_root: Path | None = None  # local files are read only under it
    allowed_hosts: tuple[str, ...] = ()  # http(s) hosts the operator allows


@dataclass
class MediaSource:
    """A media item ready to decode: a local path (ours to delete if `temporary`)."""

    path: Path
    temporary: bool = False
    digest: str = field(default="")

    def cleanup(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)


def resolve(url: str, limits: MediaLimits) -> MediaSource:
    """The local file behind `url`, within the limits; raises MediaError otherwise."""
    if not isinstance(url, str) or not url:
        raise MediaError(400, "a media URL must be a non-empty string", "invalid_media_url")
    if url.startswith("data:"):
        return _data_url(url, limits)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return _download(url, parsed.hostname or "", limits)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(403, f"file URLs must name a local path, got host {parsed.netloc!r}", "media_forbidden")
        return _local(Path(unquote(parsed.path)), limits)
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:" is a drive, not a scheme
        raise MediaError(400, f"unsupported media URL scheme {parsed.scheme!r}: use data:, file:// or a path", "invalid_media_url")
    return _local(Path(url), limits)


def _local(path: Path, limits: MediaLimits) -> MediaSource:
    if limits.media_root is None:
        raise MediaError(403, "this server reads no local files (it was started without --media-root)", "media_forbidden")
    root = limits.media_root.resolve()
    candidate = path if path.is_absolute() else root / path
    try:
        resolved = candidate.resolve()  # follows symlinks: a link pointing out is outside
    except (OSError, ValueError) as err:  # a NUL byte, a symlink loop
        raise MediaError(400, f"not a usable path: {err}", "invalid_media_url") from None
    if not resolved.is_relative_to(root):
        raise MediaError(403, f"{path} is outside the media root", "media_forbidden")
    if not resolved.is_file():
        raise MediaError(400, f"no media file {path} under the media root", "media_not_found")
    if resolved.stat().st_size > limits.max_bytes:
        raise MediaError(413, f"{path} is larger than the limit of {limits.max_bytes} bytes", "media_too_large")
    return MediaSource(resolved)


def _data_url(url: str, limits: MediaLimits) -> MediaSource:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
        raise MediaError(400, "data: URLs must be base64 (data:<mime>;base64,<data>)", "invalid_media_url")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise MediaError(413, f"the data: URL holds more than the limit of {limits.max_bytes} bytes", "media_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(400, f"the data: URL is not valid base64: {err}", "invalid_media_url") from None
    return _temporary(data)


def _download(url: str, host: str, limits: MediaLimits) -> MediaSource:
    if host not in limits.allowed_hosts:
        raise MediaError(403, f"remote media from {host or url!r} is not allowed (the operator allows: "
                              f"{', '.join(limits.allowed_hosts) or 'no hosts'})", "media_forbidden")
    import httpx

    chunks, size = [], 0
    try:
        with httpx.stream("GET", url, timeout=30.0, follow_redirects=False) as response:
            if response.status_code != 200:
                raise MediaError(422, f"fetching {url} gave HTTP {response.status_code}", "media_unreadable")
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limits.max_bytes:
                    raise MediaError(413, f"{url} is larger than the limit of {limits.max_bytes} bytes", "media_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as err:
        raise MediaError(422, f"cannot fetch {url}: {err}", "media_unreadable") from None
    return _temporary(b"".join(chunks))


def _temporary(data: bytes) -> MediaSource:
    handle, name = tempfile.mkstemp(prefix="crosslmm-media-")
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    return MediaSource(Path(name), temporary=True, digest=hashlib.sha256(data).hexdigest())


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_duration(path: Path, limits: MediaLimits) -> None:
    """Refuse a video longer than the limit from its container header, before decoding
    (a still image passes: it has no duration)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (container.duration or 0) / 1_000_000
    except av.FFmpegError:
        return  # not a container FFmpeg reads (an image, or a broken file): decoding will say which
    if seconds > limits.max_seconds:
        raise MediaError(413, f"the video is {seconds:.0f} s long, over the limit of {limits.max_seconds:.0f} s",
                         "video_too_long")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EncodedVideoCache:
    """Vision features of recently asked videos, keyed by a hash of the file's bytes and
    the frame sampling, bounded in bytes (least recently used first out). A second
    question about a video skips decoding and the vision tower."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = features
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    @property
    def size_bytes(self) -> int:
        return self._bytes
