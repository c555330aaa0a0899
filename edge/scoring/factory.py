"""The one scorer factory: the scorer a station scores with, built in one place for every caller (the
line's start, reload, enrollment and learn paths, eval, the CLI, the demo).

`build_scorer(pack, state, tiling, ...)` resolves the scorer kind, then builds it through the registry
(edge.scoring.registry), where each kind's module registers its builder:

    tiled         the station tiles (edge.scoring.tiling; refuses a tiling other than the enrolled one)
    student       the learned scorer, where edge.scoring.student.chosen_student picks it (kind student/auto)
    memory_bank   else, by the pack's scorer kind: the bank scorer or its station graph (edge.scoring.station_graph)
    anomalygpt    an AnomalyGPT pack's scorer (edge.scoring.anomalygpt)

and refuses a state calibrated with other numerics than the backend's (edge.scoring.numerics), except for
a kind that runs its own graph. Adding a scorer kind is its module plus one registry entry; the pack names
the kind (pack.yaml `scorer.kind`) and the module is imported below:

    # edge/scoring/my_kind.py
    from edge.scoring.registry import ScorerRequest, register_scorer

    @register_scorer("my_kind")
    def build_my_kind_scorer(request: ScorerRequest) -> MyKindScorer:
        return MyKindScorer(request.pack, request.state.bank, request.state.calibration.threshold, ...)

    # here
    import edge.scoring.my_kind  # noqa: F401  (registers my_kind)

This module must not import edge.station: the state arrives as an object.
"""
from __future__ import annotations

import edge.scoring.anomalygpt  # noqa: F401  (each of these registers its scorer kind)
import edge.scoring.station_graph  # noqa: F401
import edge.scoring.tiling  # noqa: F401
from edge.errors import StateError
from edge.inference.features import FeatureExtractor
from edge.pack import Pack
from edge.scoring.numerics import check
from edge.scoring.registry import ScorerRequest, scorer_kind
from edge.scoring.student import StudentScorer, chosen_student


def build_scorer(pack: Pack, state, tiling=None, *, kind: str = "bank", allow_undertrained: bool = False,
                 cpu_scoring: str = "numpy", backend=None, extractor=None, replacing=None):
    """The scorer a station's configuration asks for, from its state.

    `tiling`: the TilingSpec the station tiles with (None: whole frames); it must be the one the state
    was enrolled with. `kind` bank, student or auto (edge.scoring.student decides: never a student that did
    not complete its training; student refuses one unless `allow_undertrained`). `cpu_scoring`
    station_graph: a bank scorer whose encoder runs on ONNX Runtime's CPU scores with the one station graph
    where it covers the state. `backend`: the encoder's Backend; `extractor`: an encoder session to reuse;
    `replacing`: the scorer this one replaces (reload, enrollment), whose encoder session is reused unless
    it ran its own graph (a student)."""
    enrolled = state.tiling_spec
    if enrolled != tiling:
        raise StateError(f"station state was enrolled with {_tiling_words(enrolled)} but the configuration asks for "
                         f"{_tiling_words(tiling)}: enroll again with the configured tiling")
    if extractor is None and replacing is not None and not isinstance(replacing, StudentScorer):
        # Its encoder session, fed at this state's size: the one replaced may have run at another.
        old = replacing.extractor
        extractor = old if old.pack is pack else FeatureExtractor(pack, old.backend)
    request = ScorerRequest(pack, state, tiling, kind, allow_undertrained, cpu_scoring, backend, extractor)
    resolved = resolve_kind(request)
    if getattr(state, "input_size", None) is not None and resolved != "student":
        # The station feeds its frames at their own aspect ratio (edge.station.input_size): the pack at that
        # size, on the encoder session given (ONNX Runtime takes any size the pack allows).
        pack = pack.at_input_size(*state.input_size)
        if extractor is not None:
            extractor = FeatureExtractor(pack, extractor.backend)
        request = ScorerRequest(pack, state, tiling, kind, allow_undertrained, cpu_scoring, backend, extractor)
    entry = scorer_kind(resolved, pack)
    scorer = entry.build(request)
    if entry.checks_engine:
        check(state, scorer.extractor.backend)  # the threshold holds for its numerics only
    return scorer


def resolve_kind(request: ScorerRequest) -> str:
    """Which registered kind scores `request`: tiled where the station tiles, student where the station's
    choice picks the state's student, else the pack's scorer kind."""
    if request.tiling is not None:
        if request.kind == "student":
            raise StateError("scorer student scores whole frames: use scorer bank (or auto) with tiling")
        return "tiled"
    if request.kind != "bank" and chosen_student(request.state, request.kind, request.allow_undertrained) is not None:
        return "student"
    return request.pack.scorer.kind


def _tiling_words(spec) -> str:
    if spec is None:
        return "no tiling (whole frames)"
    return (f"tiling scale {spec.scale:g}, overlap {spec.overlap:g}, {spec.bank} bank"
            f"{'' if spec.bank_patches is None else f' of {spec.bank_patches}'}, roi {spec.roi.kind}"
            f"{f' {list(spec.roi.rect)}' if spec.roi.rect else ''}, align {spec.roi.align}")
