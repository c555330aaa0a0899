"""The `source:` section of a station configuration: one model per kind of camera or replay (edge.line.config
embeds them as `SourceSpec`, edge.line.sources opens them). It owns the keys and their limits, not the opening.

    source: {kind: usb, device: 0}          # usb | rtsp | file | folder | gstreamer | synthetic
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field

from edge.scoring.frozen_spec import FrozenSpec

SOURCE_KINDS = ("usb", "rtsp", "file", "folder", "gstreamer", "synthetic")


class Reconnect(FrozenSpec):
    initial_delay_s: float = Field(default=0.5, gt=0)
    max_delay_s: float = Field(default=30.0, gt=0)
    # Consecutive failed reads before a live source is declared lost and reopened.
    max_failed_reads: int = Field(default=5, ge=1)


class _SourceBase(FrozenSpec):
    reconnect: Reconnect = Reconnect()
    # Replay sources: emulate a camera at this rate (then they drop frames like one); null = as fast
    # as scoring takes them, nothing dropped.
    fps: float | None = Field(default=None, gt=0)


class UsbSource(_SourceBase):
    kind: Literal["usb"]
    device: int | str = 0  # V4L2 index or /dev/videoN
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)


class StreamSource(_SourceBase):
    kind: Literal["rtsp"]
    url: str = Field(pattern=r"^(rtsps?|https?)://\S+$")


class FileSource(_SourceBase):
    kind: Literal["file"]
    path: Path
    loop: bool = False


class FolderSource(_SourceBase):
    kind: Literal["folder"]
    path: Path
    loop: bool = False


class GstreamerSource(_SourceBase):
    kind: Literal["gstreamer"]
    pipeline: str = Field(min_length=1)  # must end in an appsink


class SyntheticSource(_SourceBase):
    kind: Literal["synthetic"]
    seed: int = Field(default=0, ge=0)
    defect_rate: float = Field(default=0.2, ge=0, le=1)
    size: int = Field(default=256, ge=64, le=4096)
    count: int | None = Field(default=None, gt=0)  # parts before the stream ends (null: endless)


SourceSpec = Annotated[
    Union[UsbSource, StreamSource, FileSource, FolderSource, GstreamerSource, SyntheticSource],
    Field(discriminator="kind"),
]
