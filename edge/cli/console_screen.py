"""What the technician console prints, laid out for an 80-column terminal: part rows, wrapped text and
paths, the explainer's status in words, and a heatmap preview drawn in characters (or colour)."""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from edge.errors import EdgeError

SHADES = " .:-=+*%"
WIDTH = 80


def parse_when(text: str, now: float | None = None) -> float:
    """'30m', '2h', '3d' ago, or an ISO date/time (UTC unless it says otherwise) -> epoch seconds."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise EdgeError(f"cannot read the time {text!r}: use 30m, 2h, 3d or 2026-11-24T06:00") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def short(text: str | None, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def part_line(p: dict, row: int | None = None) -> str:
    """One line per part, 80 columns: row number, the whole id (what `open` takes), time, score,
    verdict, and as much of the explanation or findings as fits (cut at a word)."""
    when = p["time"][11:19]
    verdict = {"anomalous": "FLAGGED", "normal": "ok", "error": "ERROR", "learning": "learning"}.get(p["verdict"], p["verdict"])
    score = f"{p['score']:.2f}" if isinstance(p.get("score"), (int, float)) and p["score"] == p["score"] else "-"
    number = f"{row:>2d} " if row is not None else ""
    head = f"{number}{short(p['part_id'], WIDTH - 30 - len(number))} {when} {score:>6s} {verdict}"
    words = p.get("explanation") or (p.get("findings") or {}).get("summary") or ""
    if p.get("explanation_status") == "pending" and not p.get("explanation"):
        words = "(explanation pending)"
    room = WIDTH - len(head) - 2
    return f"{head}  {short_words(words, room)}".rstrip() if room >= 8 else head


def short_words(text: str | None, n: int) -> str:
    """`text` cut to `n` columns at a word boundary, with an ellipsis when cut."""
    text = " ".join((text or "").split())
    if len(text) <= n:
        return text
    cut = text[: n - 1].rsplit(" ", 1)[0] if " " in text[: n - 1] else text[: n - 1]
    return cut.rstrip(",;:") + "…"


def wrapped(text: str, indent: str = "", first: str = "") -> list[str]:
    """`text` in lines of at most 80 columns, broken between words (a path or an id longer than a line
    is broken where it must, at a '/' when it has one)."""
    import textwrap

    return textwrap.wrap(" ".join(text.split()), WIDTH, initial_indent=first, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False) or [first.rstrip()]


def path_lines(path: str, first: str, indent: str = "  ") -> list[str]:
    """A file path in lines of at most 80 columns, broken after a '/' (copy it as one)."""
    lines, line = [], first
    for piece in re.split(r"(?<=/)", path):
        if len(line) + len(piece) > WIDTH and line.strip():
            lines.append(line)
            line = indent
        line += piece
    return lines + [line]


def explain_words(e: dict) -> str:
    """The explanation worker's state in words (the health's `explain` section)."""
    if e.get("error") and e.get("state") != "running":
        return f"explanations off: {e['error']}"
    if "state" not in e:
        return "explanations: " + ", ".join(f"{k} {v}" for k, v in e.items())
    busy = f", explaining part {e['busy_part']} now" if e.get("busy") and e.get("busy_part") else ""
    waiting = e.get("pending", 0)
    return (f"explanations {e['state']}: {waiting} part{'s' if waiting != 1 else ''} waiting "
            f"({e.get('queue_depth', 0)} in the queue of {e.get('queue_size', '?')}), {e.get('done', 0)} explained, "
            f"{e.get('failed', 0)} failed{busy}")


def model_words(h: dict) -> str:
    """The threshold and where the station's state stands (learning, refining) in words, from its health."""
    learning, refining = h.get("learning"), h.get("refining")
    if learning:
        return (f"learning: {learning['collected']} of {learning['of']} parts collected; parts are not judged "
                "until the state is built" + (f" (last try: {learning['last_error']})" if learning.get("last_error") else ""))
    words = f"threshold {h['threshold']:.4f} from {h['references']} reference(s)" if h.get("threshold") is not None \
        else "no threshold"
    if refining:
        words += (f"; refining: {refining['collected']} of {refining['of']} parts kept, then the usual-looking ones "
                  "join the references" + (" (building now)" if refining.get("building") else ""))
    return words


def heatmap_preview(overlay_path: str | None, mask_path: str | None, image_path: str | None, colour: bool,
                    cols: int = 48, rows: int = 12) -> list[str]:
    """The heatmap in the terminal: colour half-blocks from the overlay, or shades with '#' on the
    anomalous mask when colour is off."""
    if colour and overlay_path and Path(overlay_path).is_file():
        img = cv2.imread(overlay_path, cv2.IMREAD_COLOR)
        if img is not None:
            small = cv2.resize(img, (cols, rows * 2), interpolation=cv2.INTER_AREA)[:, :, ::-1]
            lines = []
            for y in range(0, rows * 2, 2):
                cells = []
                for x in range(cols):
                    (r1, g1, b1), (r2, g2, b2) = small[y, x], small[y + 1, x]
                    cells.append(f"\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m▀")
                lines.append("".join(cells) + "\x1b[0m")
            return lines
    if image_path and Path(image_path).is_file():
        grey = cv2.imread(image_path, cv2.IMREAD_GRAYSCALE)
        if grey is not None:
            grey = cv2.resize(grey, (cols, rows), interpolation=cv2.INTER_AREA)
            mask = None
            if mask_path and Path(mask_path).is_file():
                m = cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE)
                mask = cv2.resize(m, (cols, rows), interpolation=cv2.INTER_AREA) > 64 if m is not None else None
            idx = (grey.astype(np.int32) * len(SHADES) // 256).clip(0, len(SHADES) - 1)
            return ["".join("#" if mask is not None and mask[y, x] else SHADES[idx[y, x]] for x in range(cols))
                    for y in range(rows)]
    return ["(no stored image for this part: storage.keep_images, or removed by retention)"]

