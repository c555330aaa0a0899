"""Sources: folder replay, video files, the synthetic line, bad frames, and a source that dies and comes back."""
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.line.source_specs import FileSource, FolderSource, SyntheticSource
from edge.line.sources import CaptureSource, FolderReplay, ReconnectingSource, SourceLost, make_source
from edge.line.synthetic import SyntheticLine


def write_parts(folder: Path, n: int, start: int = 0) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = [p.image for p in SyntheticLine(seed=1).parts(n, start=start)]
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"part-{start + i:03d}.png"), img)
    return images


def write_video(path: Path, n: int, step: int) -> Path:
    """An MJPG video of n flat frames of grey i * step (MJPG is lossy: compare rounded means)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(n):
        writer.write(np.full((48, 64, 3), step * i, np.uint8))
    writer.release()
    return path


def read_all(source, limit: int = 1000) -> list:
    frames = []
    while len(frames) < limit and (f := source.read()) is not None:
        frames.append(f)
    return frames


def test_folder_replay_reads_every_image_in_name_order(tmp_path):
    images = write_parts(tmp_path / "in", 5)
    src = ReconnectingSource(make_source(FolderSource(kind="folder", path=tmp_path / "in")))
    frames = read_all(src)
    assert [f.meta["file"] for f in frames] == [f"part-{i:03d}.png" for i in range(5)]
    assert all(np.array_equal(f.image, img) for f, img in zip(frames, images))
    assert src.state == "ended" and not src.live


def test_corrupt_and_empty_frames_are_counted_and_skipped(tmp_path):
    write_parts(tmp_path / "in", 3)
    (tmp_path / "in" / "part-000b.png").write_bytes(b"")
    (tmp_path / "in" / "part-001b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = ReconnectingSource(FolderReplay(tmp_path / "in"))
    frames = read_all(src)
    assert [f.meta["file"] for f in frames] == ["part-000.png", "part-001.png", "part-002.png"]
    assert src.bad_frames == 2


def test_video_file_frames_and_loop(tmp_path):
    path = write_video(tmp_path / "line.avi", 6, 40)
    once = read_all(ReconnectingSource(make_source(FileSource(kind="file", path=path))))
    assert len(once) == 6
    assert [round(f.image.mean() / 40) for f in once] == [0, 1, 2, 3, 4, 5]  # MJPG is lossy, order is not
    looped = read_all(ReconnectingSource(make_source(FileSource(kind="file", path=path, loop=True))), limit=15)
    assert len(looped) == 15 and round(looped[6].image.mean() / 40) == 0


def test_missing_video_file_is_lost_not_fatal():
    src = CaptureSource(Path("/nonexistent/line.avi"), "video", live=False)
    with pytest.raises(SourceLost, match="does not exist"):
        src.open()


def test_synthetic_source_carries_the_truth_and_paces_like_a_camera():
    spec = SyntheticSource(kind="synthetic", seed=0, defect_rate=0.5, count=6, fps=50)
    src = ReconnectingSource(make_source(spec))
    t0 = time.monotonic()
    frames = read_all(src)
    assert len(frames) == 6 and src.live
    assert time.monotonic() - t0 >= 5 / 50 * 0.9
    truth = [SyntheticLine(seed=0, defect_rate=0.5).part(i).defect for i in range(6)]
    assert [f.meta["defect"] for f in frames] == truth


@pytest.mark.timeout(30)
def test_a_folder_that_disappears_and_comes_back_is_reopened_with_backoff(tmp_path):
    folder = tmp_path / "in"
    write_parts(folder, 3)
    states = []
    src = ReconnectingSource(FolderReplay(folder, loop=True), initial_delay_s=0.05, max_delay_s=0.2,
                             on_state=lambda s, d: states.append(s))
    assert src.read() is not None
    shutil.move(str(folder), str(tmp_path / "away"))
    got = []
    reader = threading.Thread(target=lambda: got.append(src.read()))
    reader.start()
    deadline = time.monotonic() + 5
    while src.reconnects < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert src.state in ("lost", "connecting") and src.reconnects >= 3
    shutil.move(str(tmp_path / "away"), str(folder))
    reader.join(5)
    assert got and got[0] is not None, "no frame after the folder came back"
    assert states[:1] == ["streaming"] and "lost" in states and states[-1] == "streaming"
    src.close()


class _FlakyDevice:
    """A source whose device node vanishes under the read once (the OS raises, not the source)."""
    name, live = "flaky device", True

    def __init__(self):
        self.reads = 0

    def open(self):
        pass

    def read(self):
        self.reads += 1
        if self.reads == 2:
            raise FileNotFoundError(2, "No such file or directory", "/dev/video0")
        return None if self.reads > 3 else object()

    def close(self):
        pass


def test_an_os_error_under_a_read_is_a_lost_source_not_a_dead_capture_thread():
    states = []
    src = ReconnectingSource(_FlakyDevice(), initial_delay_s=0.01, on_state=lambda s, d: states.append((s, d)))
    assert src.read() is not None
    assert src.read() is not None, "the read after the OSError did not go on"
    assert [s for s, _ in states] == ["streaming", "lost", "connecting", "streaming"]
    assert "No such file or directory" in states[1][1] and src.reconnects == 1


def test_a_folder_gone_between_the_check_and_the_listing_is_lost(tmp_path, monkeypatch):
    """The race a clean-clone run hit: is_dir() said yes, the listing then found nothing there."""
    folder = tmp_path / "in"
    write_parts(folder, 2)
    import edge.line.sources as sources
    real_listing = sources.list_images

    def listing_of_a_folder_just_moved(path):
        shutil.move(str(folder), str(tmp_path / "away"))
        return real_listing(path)

    monkeypatch.setattr(sources, "list_images", listing_of_a_folder_just_moved)
    replay = FolderReplay(folder, loop=True)
    with pytest.raises(SourceLost, match="cannot list the folder"):
        replay.open()


def test_gstreamer_without_gstreamer_in_opencv_fails_once_with_the_reason():
    from edge.line.source_specs import GstreamerSource
    from edge.line.sources import SourceError, gstreamer_available

    if gstreamer_available():
        pytest.skip("this OpenCV has GStreamer")
    states = []
    src = ReconnectingSource(make_source(GstreamerSource(kind="gstreamer", pipeline="videotestsrc ! appsink")),
                             on_state=lambda s, d: states.append(s))
    with pytest.raises(SourceError, match="built without GStreamer"):
        src.read()
    assert states == ["failed"]


@pytest.mark.timeout(60)
def test_an_http_stream_is_read_as_a_live_source(tmp_path):
    import functools
    import http.server

    from edge.line.source_specs import StreamSource

    write_video(tmp_path / "line.avi", 5, 50)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/line.avi"
    src = ReconnectingSource(make_source(StreamSource(kind="rtsp", url=url)), initial_delay_s=0.05)
    try:
        frames = [src.read() for _ in range(5)]
        assert [round(f.image.mean() / 50) for f in frames] == [0, 1, 2, 3, 4] and src.live
    finally:
        server.shutdown()
        server.server_close()
