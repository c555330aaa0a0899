"""Station state, its persistence: the memory bank of normal patches, the calibrated threshold, the
few-shot head, the tiling and the student a station scores with, saved beside the pack.

`StationState.save` writes every array under a content-addressed name and points state.yaml at them
(replaced last); `load_state` reads it back, checking every sha256 and the encoder it was enrolled with.
Building a state is enrollment's (edge.station.enrollment, few_shot_enrollment, tiled_enrollment); this
module must not import them.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from pydantic import ValidationError

from edge.errors import StateError
from edge.inference.preprocess import read_image
from edge.pack import Pack
from edge.scoring.bank import MemoryBank
from edge.scoring.calibration import Calibration
from edge.scoring.fewshot import FewShotHead
from edge.scoring.student import StudentSpec
from edge.scoring.frozen_spec import problems
from edge.scoring.tiling import Layout, TilingSpec

STATE_SCHEMA_VERSION = 1
STATE_FILE = "state.yaml"
GOOD_DIR = "good"
ROI_REFERENCE = "roi-reference.png"


@dataclass
class StationState:
    pack_model_id: str
    pack_encoder_sha256: str
    bank: MemoryBank
    calibration: Calibration
    references: list[str] = field(default_factory=list)  # file names under good/ (may be empty in memory)
    info: dict = field(default_factory=dict)
    tile_banks: list[MemoryBank] = field(default_factory=list)  # per-tile banks of positions 1.. (bank is 0)
    layout: Layout | None = None  # the tiling enrolled with (None: whole-frame scoring)
    student: StudentSpec | None = None  # the learned scorer, when trained (enroll --scorer student)
    head: FewShotHead | None = None  # the few-shot patch scorer (None: nearest-neighbour bank only)
    # (height, width) the encoder is fed for this station's frames (aspect ratio kept); None: the pack's size.
    input_size: tuple[int, int] | None = None
    root: Path | None = None  # the folder it was loaded from or saved to

    @property
    def banks(self) -> list[MemoryBank]:
        return [self.bank, *self.tile_banks]

    @property
    def tiling_spec(self):
        """The TilingSpec enrolled with, or None for whole-frame scoring."""
        return self.layout.spec if self.layout is not None else None

    def save(self, root: str | Path) -> Path:
        """Write the bank under a content-addressed name, then point state.yaml at it (replaced last),
        then drop older banks: a crash at any step leaves the previous, consistent state readable."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        digest = bank_digest(self.bank)
        bank_name = f"bank-{digest[:16]}.npz"
        _atomic_write(root / bank_name, lambda f: np.savez(f, **bank_arrays(self.bank)))
        keep = {bank_name}
        if self.student is not None:
            keep.add(self.student.file)
        tiling = None
        if self.layout is not None:
            tiling = self.layout.to_dict()
            tiling["tile_banks"] = []
            for b in self.tile_banks:
                d = bank_digest(b)
                name = f"bank-{d[:16]}.npz"
                _atomic_write(root / name, lambda f, b=b: np.savez(f, **bank_arrays(b)))
                tiling["tile_banks"].append({"file": name, "sha256": d})
                keep.add(name)
            if self.layout.reference is not None:
                ok, png = cv2.imencode(".png", self.layout.reference)
                _atomic_write(root / ROI_REFERENCE, lambda f: f.write(png.tobytes()))
                tiling["reference"] = ROI_REFERENCE
        doc = {
            "schema_version": STATE_SCHEMA_VERSION,
            "pack": {"model_id": self.pack_model_id, "encoder_sha256": self.pack_encoder_sha256},
            "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "bank": {"file": bank_name, "patches": len(self.bank), "channels": self.bank.channels,
                     "dims": int(self.bank.features.shape[1]), "sha256": digest},
            "calibration": self.calibration.to_dict(),
            "references": self.references,
            "info": self.info,
        }
        if self.input_size is not None:
            doc["input_size"] = [int(v) for v in self.input_size]
        if tiling is not None:
            doc["tiling"] = tiling
        if self.student is not None:
            self.student.check_file(root)
            doc["student"] = self.student.to_dict()
        if self.head is not None:
            arrays = self.head.arrays()
            digest = _arrays_digest(arrays)
            name = f"head-{digest[:16]}.npz"
            _atomic_write(root / name, lambda f: np.savez(f, **arrays))
            keep.add(name)
            doc["head"] = {**self.head.to_dict(), "file": name, "sha256": digest}
        _atomic_write(root / STATE_FILE, lambda f: f.write(yaml.safe_dump(doc, sort_keys=False).encode()))
        for old in [*root.glob("bank-*.npz"), *root.glob("student-*.onnx"), *root.glob("head-*.npz")]:
            if old.name not in keep:
                old.unlink(missing_ok=True)
        self.root = root
        return root


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def bank_arrays(bank: MemoryBank) -> dict[str, np.ndarray]:
    arrays = {"features": bank.features}
    if bank.components is not None:
        arrays.update(mean=bank.mean, components=bank.components)
    if bank.groups > 1:
        arrays["groups"] = np.array(bank.groups)
    return arrays


def bank_digest(bank: MemoryBank) -> str:
    return _arrays_digest(bank_arrays(bank))


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name, array in arrays.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _load_head(root: Path, entry: dict, path: Path) -> FewShotHead:
    head_path = root / entry["file"]
    with np.load(head_path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if _arrays_digest(arrays) != entry.get("sha256"):
        raise StateError(f"{head_path}: few-shot head does not match the sha256 in {path}")
    return FewShotHead.from_parts(entry, arrays)


def load_state(root: str | Path, pack: Pack | None = None) -> StationState:
    root = Path(root)
    path = root / STATE_FILE
    if not path.is_file():
        if (root / "pack.yaml").is_file():
            # A pack folder given as the state: the state lives beside the pack, never inside it.
            raise StateError(f"{root} is a model pack, not a station state; enroll good parts into a folder of "
                             f"their own: anomaly-edge enroll --pack {root} --good DIR --out station (and pass "
                             "that folder as --state)")
        raise StateError(f"{path}: missing (enroll good parts first: anomaly-edge enroll --pack P --good DIR --out {root})")
    try:
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or doc.get("schema_version") != STATE_SCHEMA_VERSION:
            version = doc.get("schema_version") if isinstance(doc, dict) else None
            raise StateError(f"{path}: schema_version {version!r} not supported ({STATE_SCHEMA_VERSION})")
        bank = _load_bank(root, doc["bank"], path)
        tiling = doc.get("tiling")
        layout, tile_banks = None, []
        if tiling is not None:
            tile_banks = [_load_bank(root, b, path) for b in tiling.get("tile_banks") or []]
            reference = read_image(root / tiling["reference"]) if tiling.get("reference") else None
            try:
                spec = TilingSpec.model_validate({k: v for k, v in tiling.items()
                                                  if k not in ("tile_banks", "reference", "roi_size")})
            except ValidationError as e:
                raise StateError(f"{path}: {problems(e, 'tiling')}") from None
            layout = Layout(spec, tuple(int(v) for v in tiling["roi_size"]), reference)
        state = StationState(str(doc["pack"]["model_id"]), str(doc["pack"]["encoder_sha256"]), bank,
                             Calibration.from_dict(doc["calibration"]), list(doc.get("references") or []),
                             dict(doc.get("info") or {}), tile_banks, layout, root=root)
        if doc.get("student") is not None:
            state.student = StudentSpec.from_dict(doc["student"])
            state.student.check_file(root)
        if doc.get("head") is not None:  # absent in states written before few-shot enrollment
            state.head = _load_head(root, doc["head"], path)
        if doc.get("input_size") is not None:  # absent: the pack's input size
            size = doc["input_size"]
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
                raise StateError(f"{path}: input_size must be [height, width] in pixels, got {size!r}")
            state.input_size = (size[0], size[1])
    except StateError:
        raise
    except Exception as e:
        raise StateError(f"{path}: unreadable station state: {type(e).__name__}: {e}") from None
    if pack is not None:
        check_state_matches_pack(state, pack, path)
    return state


def _load_bank(root: Path, entry: dict, path: Path) -> MemoryBank:
    bank_path = root / entry["file"]
    with np.load(bank_path, allow_pickle=False) as arrays:
        groups = int(arrays["groups"]) if "groups" in arrays else 1
        bank = MemoryBank(arrays["features"], arrays.get("mean"), arrays.get("components"), groups)
    if bank_digest(bank) != entry.get("sha256"):
        raise StateError(f"{bank_path}: memory bank does not match the sha256 in {path}")
    return bank


def check_state_matches_pack(state: StationState, pack: Pack, where) -> None:
    encoder_sha = pack.encoder_sha256
    if state.pack_encoder_sha256 != encoder_sha:
        raise StateError(f"{where}: enrolled with pack {state.pack_model_id} (encoder {state.pack_encoder_sha256[:12]}), "
                         f"not with {pack.model_id} (encoder {encoder_sha[:12]}): enroll again for this pack")
    if state.bank.channels != pack.encoder.feature_shape[0]:
        raise StateError(f"{where}: bank has {state.bank.channels} channels, pack features have {pack.encoder.feature_shape[0]}")
