"""The scorer registry: which function builds the scorer of each scorer kind, and what it is given.

Each scorer module registers its kind here (`@register_scorer("anomalygpt")`); `edge.scoring.factory`
resolves which kind scores a station and builds it through this table. Owns the table and the request a
builder receives; it must not import any scorer module (they import it), nor edge.station (the state
arrives as an object: its `bank`, `banks`, `head`, `calibration`, `layout`, `student`, `root`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge.errors import PackError
from edge.pack import Pack


@dataclass(frozen=True)
class ScorerRequest:
    """What a builder gets: the pack, the station state and the station's scorer options."""

    pack: Pack
    state: object  # the station state (edge.station.state.StationState)
    tiling: object | None = None  # the TilingSpec the station asks for (None: whole frames)
    kind: str = "bank"  # the station's choice: bank, student or auto (edge.scoring.student)
    allow_undertrained: bool = False  # kind student: score with a student that did not complete its training
    cpu_scoring: str = "numpy"  # station_graph: the bank scorer runs as one ONNX graph on ONNX Runtime's CPU
    backend: object | None = None  # the encoder's Backend (None: the pack's default)
    extractor: object | None = None  # a FeatureExtractor whose encoder session the scorer may reuse


@dataclass(frozen=True)
class ScorerKind:
    """A registered kind: its builder, and whether the state's engine numerics must match the backend's
    (False for a scorer that runs its own graph with its own calibration, as the student does)."""

    name: str
    build: Callable[[ScorerRequest], object]
    checks_engine: bool = True


SCORER_KINDS: dict[str, ScorerKind] = {}


def register_scorer(kind: str, checks_engine: bool = True):
    """Decorator: register `build(request) -> scorer` as the builder of scorer kind `kind`."""
    def register(build: Callable[[ScorerRequest], object]):
        known = SCORER_KINDS.get(kind)
        if known is not None and known.build is not build:
            raise ValueError(f"scorer kind {kind!r} is already registered (by {known.build.__module__}."
                             f"{known.build.__qualname__})")
        SCORER_KINDS[kind] = ScorerKind(kind, build, checks_engine)
        return build
    return register


def scorer_kind(kind: str, pack: Pack | None = None) -> ScorerKind:
    """The registered kind `kind`; a PackError naming it and the known kinds when none is."""
    entry = SCORER_KINDS.get(kind)
    if entry is None:
        where = f"{pack.root}: " if pack is not None else ""
        raise PackError(f"{where}scorer kind {kind!r} has no scorer (known kinds: {', '.join(sorted(SCORER_KINDS))})")
    return entry
