"""The source stage: frames from a camera, a stream, a file, a folder or the synthetic line.

Every source has `open()`, `read()` and `close()`. `read()` returns a `Frame`, or None at the end of a
finite stream; it raises `SourceLost` when the device or stream is gone (the capture loop reopens it with
backoff, see `ReconnectingSource`) and `ImageError` for one bad frame (counted and skipped).
`live` sources (cameras, streams, replays paced at a camera rate) keep running whether or not we keep
up, so the pipeline drops their oldest frames when scoring falls behind; replays taken as fast as
scoring goes are never dropped.

Owns frames and reconnection. Must not queue, score or drop frames (edge.line.pipeline does).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge.line.source_specs import FileSource, FolderSource, GstreamerSource, StreamSource, SyntheticSource, UsbSource
from edge.errors import EdgeError, ImageError
from edge.inference.preprocess import check_frame, list_images, read_image
from edge.line.synthetic import SyntheticLine

log = logging.getLogger(__name__)


class SourceLost(EdgeError):
    """The camera, stream or folder cannot be read now; it may come back."""


class SourceError(EdgeError):
    """The source cannot work as configured (retrying will not help)."""


def gstreamer_available() -> bool:
    import re

    found = re.search(r"GStreamer:\s*(\S+)", cv2.getBuildInformation())
    return bool(found and found.group(1).upper() != "NO")


@dataclass
class Frame:
    image: np.ndarray
    captured_at: float                       # time.time() at capture
    index: int                               # position in this source's stream since start
    meta: dict = field(default_factory=dict)  # e.g. the file name or the synthetic part's truth


class _Paced:
    """Sleeps between frames to hold a replay at `fps` (None: no pacing)."""

    def __init__(self, fps: float | None):
        self.period = 1.0 / fps if fps else 0.0
        self.next_at = 0.0

    def wait(self) -> None:
        if not self.period:
            return
        now = time.monotonic()
        if self.next_at > now:
            time.sleep(self.next_at - now)
        self.next_at = max(self.next_at, now) + self.period


class CaptureSource:
    """OpenCV VideoCapture: a V4L2/USB device, an RTSP/HTTP stream, a video file or a GStreamer pipeline."""

    def __init__(self, target, name: str, live: bool, api: int = cv2.CAP_ANY, loop: bool = False,
                 fps: float | None = None, size: tuple[int, int] | None = None, max_failed_reads: int = 5):
        self.target, self.name, self.live, self.api, self.loop = target, name, live, api, loop
        self.size, self.max_failed_reads = size, max_failed_reads
        self._pace = _Paced(fps)  # only replays are given one: a file with `fps` plays at that rate
        self._cap: cv2.VideoCapture | None = None
        self._index = 0

    def open(self) -> None:
        if self.api == cv2.CAP_GSTREAMER and not gstreamer_available():
            # Retrying would never help: say so once, as a configuration error.
            raise SourceError(f"{self.name}: this OpenCV ({cv2.__version__}) was built without GStreamer; use a build "
                              "with it (e.g. JetPack's python3-opencv) or another source kind")
        if isinstance(self.target, Path) and not self.target.is_file():
            raise SourceLost(f"{self.name}: {self.target} does not exist")
        cap = cv2.VideoCapture(self.target if not isinstance(self.target, Path) else str(self.target), self.api)
        if not cap.isOpened():
            cap.release()
            raise SourceLost(f"{self.name}: cannot open {self.target}")
        if self.size:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        self._cap = cap

    def read(self) -> Frame | None:
        if self._cap is None:
            raise SourceLost(f"{self.name}: not open")
        self._pace.wait()
        rewound = False
        for _ in range(self.max_failed_reads):
            ok, img = self._cap.read()
            if ok and img is not None:
                self._index += 1
                return Frame(check_frame(img, f"{self.name} frame {self._index}"), time.time(), self._index - 1)
            if isinstance(self.target, Path):  # a file: the end, or start over
                if not self.loop or rewound:
                    return None
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                rewound = True
        raise SourceLost(f"{self.name}: {self.max_failed_reads} reads in a row failed from {self.target}")

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class FolderReplay:
    """Images from a folder in name order (re-listed at each pass, so files can be added).

    Without `loop` every file is replayed once: reopened after the folder went away (unmounted, moved),
    the replay goes on with the files it has not read yet, and once it has ended it stays ended."""

    def __init__(self, folder: Path, loop: bool = False, fps: float | None = None):
        self.folder, self.loop = Path(folder), loop
        self.name = f"folder {self.folder}"
        self.live = fps is not None
        self._pace = _Paced(fps)
        self._files: list[Path] = []
        self._pos = 0
        self._index = 0
        self._replayed: set[str] = set()  # names read so far (without loop)
        self._ended = False

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceLost(f"{self.name}: not a folder (missing or unmounted?)")
        try:
            files = [] if self._ended else list_images(self.folder)
        except (OSError, ImageError) as e:  # gone between the check and the listing (moved, unmounted)
            raise SourceLost(f"{self.name}: cannot list the folder: {e}") from e
        self._files = [f for f in files if f.name not in self._replayed]
        self._pos = 0

    def read(self) -> Frame | None:
        if self._pos >= len(self._files):
            if not self.loop:
                self._ended = True
                return None
            self.open()
            if not self._files:
                raise SourceLost(f"{self.name}: no images left to replay")
        path = self._files[self._pos]
        self._pace.wait()
        if not self.folder.is_dir():
            raise SourceLost(f"{self.name}: folder disappeared")  # this file is read after the reopen
        self._pos += 1
        self._index += 1
        if not self.loop:
            self._replayed.add(path.name)
        # A bad file raises ImageError naming it: the caller counts it and goes on with the next.
        return Frame(read_image(path), time.time(), self._index - 1, {"file": path.name})

    def close(self) -> None:
        self._files = []


class SyntheticReplay:
    """The synthetic line (edge.line.synthetic): parts with known defects, their truth in `meta`."""

    def __init__(self, spec: SyntheticSource):
        self.line = SyntheticLine(seed=spec.seed, size=spec.size, defect_rate=spec.defect_rate)
        self.count = spec.count
        self.name = f"synthetic line (seed {spec.seed})"
        self.live = spec.fps is not None
        self._pace = _Paced(spec.fps)
        self._index = 0

    def open(self) -> None:
        pass

    def read(self) -> Frame | None:
        if self.count is not None and self._index >= self.count:
            return None
        self._pace.wait()
        part = self.line.part(self._index)
        self._index += 1
        return Frame(part.image, time.time(), self._index - 1,
                     {"synthetic_id": part.part_id, "defect": part.defect})

    def close(self) -> None:
        pass


def make_source(spec):
    """The source a config's `source:` section describes."""
    max_failed = spec.reconnect.max_failed_reads
    if isinstance(spec, UsbSource):
        size = (spec.width, spec.height) if spec.width and spec.height else None
        return CaptureSource(spec.device, f"usb camera {spec.device}", live=True, api=cv2.CAP_V4L2,
                             size=size, max_failed_reads=max_failed)
    if isinstance(spec, StreamSource):
        return CaptureSource(spec.url, f"stream {spec.url}", live=True, api=cv2.CAP_FFMPEG,
                             max_failed_reads=max_failed)
    if isinstance(spec, GstreamerSource):
        return CaptureSource(spec.pipeline, "gstreamer pipeline", live=True, api=cv2.CAP_GSTREAMER,
                             max_failed_reads=max_failed)
    if isinstance(spec, FileSource):
        return CaptureSource(Path(spec.path), f"video {spec.path}", live=spec.fps is not None, loop=spec.loop,
                             fps=spec.fps, max_failed_reads=max_failed)
    if isinstance(spec, FolderSource):
        return FolderReplay(Path(spec.path), loop=spec.loop, fps=spec.fps)
    if isinstance(spec, SyntheticSource):
        return SyntheticReplay(spec)
    raise EdgeError(f"unknown source kind {getattr(spec, 'kind', spec)!r}")


class ReconnectingSource:
    """Wraps a source: opens it, reopens it with exponential backoff when lost, reports its state.

    States: connecting, streaming, lost (waiting to retry), ended (a finite stream is done), failed (a
    configuration that cannot work: `read` raises SourceError), stopped.
    `on_state(state, detail)` is called on every change (from the capture thread).
    """

    def __init__(self, source, initial_delay_s: float = 0.5, max_delay_s: float = 30.0, on_state=None,
                 stop: threading.Event | None = None, bad_frames_before_backoff: int = 5):
        self.source = source
        self.bad_frames_before_backoff = bad_frames_before_backoff
        self._bad_in_a_row = 0
        self.initial_delay_s, self.max_delay_s = initial_delay_s, max_delay_s
        self.on_state = on_state or (lambda state, detail: None)
        self.stop_event = stop or threading.Event()
        self.state, self.detail = "connecting", ""
        self.reconnects = 0
        self.bad_frames = 0
        self._open = False
        self._delay = initial_delay_s

    @property
    def live(self) -> bool:
        return self.source.live

    @property
    def name(self) -> str:
        return self.source.name

    def _set(self, state: str, detail: str = "") -> None:
        if (state, detail) != (self.state, self.detail):
            self.state, self.detail = state, detail
            (log.warning if state == "lost" else log.info)("source %s: %s %s", self.name, state, detail)
            self.on_state(state, detail)

    def read(self) -> Frame | None:
        """The next good frame; None when a finite stream ended or `stop_event` is set."""
        while not self.stop_event.is_set():
            if not self._open:
                try:
                    self.source.open()
                    self._open = True
                except (SourceLost, OSError) as e:
                    self._lost(str(e))
                    continue
                except SourceError as e:
                    self._set("failed", str(e))
                    raise
            try:
                frame = self.source.read()
            except (SourceLost, OSError) as e:  # OSError: a device or folder gone under the read
                self.source.close()
                self._open = False
                self._lost(str(e))
                continue
            except ImageError as e:
                self._bad_frame(e)
                continue
            except SourceError as e:
                self._set("failed", str(e))
                raise
            except Exception as e:  # a driver raising something unforeseen: the capture thread lives on
                log.exception("source %s: unexpected error from the read", self.name)
                self.source.close()
                self._open = False
                self._lost(f"{type(e).__name__}: {e}")
                continue
            if frame is None:
                self._set("ended")
                return None
            self._delay = self.initial_delay_s
            self._bad_in_a_row = 0
            self._set("streaming")
            return frame
        return None

    def _bad_frame(self, error: Exception) -> None:
        """Count and skip a bad frame. A source that gives nothing but bad frames (a folder of corrupt
        files on loop, a camera sending garbage) is not spun on: after a few in a row it is reported
        `lost` and read again with the reconnect backoff, one log line per wait."""
        self.bad_frames += 1
        self._bad_in_a_row += 1
        n = self._bad_in_a_row
        if n < self.bad_frames_before_backoff:
            log.warning("source %s: skipped a bad frame: %s", self.name, error)
            return
        self._set("lost", f"{n} bad frames in a row, the last: {error}")
        log.warning("source %s: %d bad frames in a row; next read in %.1f s", self.name, n, self._delay)
        self.stop_event.wait(self._delay)
        self._delay = min(self._delay * 2, self.max_delay_s)

    def _lost(self, why: str) -> None:
        self._set("lost", why)
        self.reconnects += 1
        self.stop_event.wait(self._delay)
        self._delay = min(self._delay * 2, self.max_delay_s)
        if not self.stop_event.is_set():
            self._set("connecting", why)

    def close(self) -> None:
        self.source.close()
        self._open = False
        self._set("stopped")
