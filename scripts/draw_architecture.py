"""Draw docs/images/architecture.png from the code: edge's stage folders as boxes (their modules and lines
inside), stacked in the order of the import contract in pyproject.toml, beside the matrix of how many
imports run from each stage to each other one.

    python scripts/draw_architecture.py [--out docs/images/architecture.png]

The picture is read from the import graph each time (grimp, the library import-linter uses), so it cannot
drift from the code; tests/test_architecture.py checks the same graph.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Rows from the top: what may import what (the layers of [tool.importlinter] in pyproject.toml).
ROWS = [["cli"], ["evaluation"], ["line"], ["station", "explain"], ["scoring"], ["inference"],
        ["pack", "sqlite"], ["errors"]]
WHAT = {"cli": "the command line; export/ only from here",
        "evaluation": "datasets, metrics, eval, demo",
        "line": "config, sources, pipeline, store, outbox, MQTT, PLC, API, runtime",
        "station": "state beside the pack, enrollment, learn mode, deploy",
        "explain": "findings, prompts, claim check, LLM engine, dialogue",
        "scoring": "bank, heads, calibration, scorers, decide, overlays",
        "inference": "preprocess, backends (ORT, TensorRT), device, CUDA",
        "pack": "the contract with export/", "sqlite": "database helper", "errors": "error types"}
FONT = cv2.FONT_HERSHEY_SIMPLEX
INK, SOFT, FILL = (40, 40, 40), (110, 110, 110), (246, 238, 228)


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "edge" else None


def read_house():
    import grimp

    graph = grimp.build_graph("edge")
    lines: dict[str, list[tuple[str, int]]] = {}
    arrows: Counter = Counter()
    for module in sorted(graph.modules):
        stage = stage_of(module)
        if stage is None:
            continue
        path = ROOT / Path(*module.split("."))
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if file.name != "__init__.py":
            name = ".".join(module.split(".")[2:]) or module.split(".")[1]
            lines.setdefault(stage, []).append((name, len(file.read_text().splitlines())))
        for imported in graph.find_modules_directly_imported_by(module):
            target = stage_of(imported)
            if target and target != stage:
                arrows[(stage, target)] += 1
    return lines, arrows


def draw(lines, arrows, out: Path) -> None:
    """Left: the stages stacked in contract order, each with its modules (over 400 lines in red). Right: the
    stage-to-stage import matrix; a house that imports downwards only has numbers below the diagonal alone."""
    stages = [s for row in ROWS for s in row]
    stack_w, row_h, gap, margin, cell = 1000, 132, 22, 30, 64
    matrix_x = margin + stack_w + 60
    width = matrix_x + 110 + cell * len(stages) + margin
    height = margin * 2 + 50 + len(ROWS) * (row_h + gap)
    img = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(img, "edge/: its stages, top imports bottom (read from the code)", (margin, 40), FONT, 0.8, INK, 2,
                cv2.LINE_AA)
    for r, row in enumerate(ROWS):
        y0 = margin + 50 + r * (row_h + gap)
        box_w = (stack_w - (len(row) - 1) * 20) // len(row)
        for c, stage in enumerate(row):
            x0 = margin + c * (box_w + 20)
            cv2.rectangle(img, (x0, y0), (x0 + box_w, y0 + row_h), FILL, cv2.FILLED)
            cv2.rectangle(img, (x0, y0), (x0 + box_w, y0 + row_h), INK, 2)
            mods = lines.get(stage, [])
            folder = (ROOT / "edge" / stage).is_dir()
            title = f"{stage}/" if folder else f"{stage}.py"
            cv2.putText(img, f"{title}  {sum(n for _, n in mods)} lines", (x0 + 10, y0 + 26), FONT, 0.65, INK, 2,
                        cv2.LINE_AA)
            cv2.putText(img, WHAT.get(stage, ""), (x0 + 10, y0 + 48), FONT, 0.45, SOFT, 1, cv2.LINE_AA)
            x, y = x0 + 10, y0 + 70
            for name, n in (mods if folder else []):
                word = f"{name} {n}"
                (tw, _), _ = cv2.getTextSize(word, FONT, 0.4, 1)
                if x + tw > x0 + box_w - 8:
                    x, y = x0 + 10, y + 17
                if y > y0 + row_h - 4:
                    break
                cv2.putText(img, word, (x, y), FONT, 0.4, (0, 0, 200) if n > 400 else INK, 1, cv2.LINE_AA)
                x += tw + 12
    # The matrix: row = the importing stage, column = the imported one.
    top = margin + 50 + 110
    cv2.putText(img, "imports from (column) by (row)", (matrix_x, margin + 50 + 20), FONT, 0.6, INK, 1, cv2.LINE_AA)
    for j, stage in enumerate(stages):
        x = matrix_x + 110 + j * cell
        org = (x + cell // 2, top - 8)
        label = np.full((24, 100, 3), 255, np.uint8)
        cv2.putText(label, stage, (2, 17), FONT, 0.5, INK, 1, cv2.LINE_AA)
        rotated = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
        img[top - 8 - 100:top - 8, org[0] - 12:org[0] + 12] = np.minimum(img[top - 8 - 100:top - 8,
                                                                         org[0] - 12:org[0] + 12], rotated)
    for i, src in enumerate(stages):
        y = top + i * cell
        cv2.putText(img, src, (matrix_x, y + cell // 2 + 6), FONT, 0.5, INK, 1, cv2.LINE_AA)
        for j, dst in enumerate(stages):
            x = matrix_x + 110 + j * cell
            n = arrows.get((src, dst), 0)
            wrong = n and next(k for k, r in enumerate(ROWS) if src in r) >= next(k for k, r in enumerate(ROWS) if dst in r) and src != dst
            colour = (200, 200, 255) if wrong else (225, 240, 225) if n else (250, 250, 250)
            cv2.rectangle(img, (x, y), (x + cell, y + cell), colour, cv2.FILLED)
            cv2.rectangle(img, (x, y), (x + cell, y + cell), (200, 200, 200), 1)
            if n:
                cv2.putText(img, str(n), (x + 18, y + cell // 2 + 7), FONT, 0.6, INK, 1, cv2.LINE_AA)
    note_y = top + len(stages) * cell + 30
    cv2.putText(img, "green: imports that point down; red: one that", (matrix_x, note_y), FONT, 0.5, SOFT, 1, cv2.LINE_AA)
    cv2.putText(img, "points up or sideways (the contract refuses it)", (matrix_x, note_y + 20), FONT, 0.5, SOFT, 1,
                cv2.LINE_AA)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), img):
        raise OSError(f"{out}: could not write")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "architecture.png"))
    args = parser.parse_args()
    lines, arrows = read_house()
    draw(lines, arrows, Path(args.out))
    up = [f"{a} -> {b}" for (a, b), _ in arrows.items()
          if next(i for i, r in enumerate(ROWS) if a in r) > next(i for i, r in enumerate(ROWS) if b in r)]
    print(f"{args.out}: {len(arrows)} stage arrows" + (f"; running upwards: {', '.join(up)}" if up else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
