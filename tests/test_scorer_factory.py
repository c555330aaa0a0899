"""The one scorer factory (edge.scoring.factory): a scorer kind is its module plus one registry entry,
the pack's scorer kind picks the builder, an unknown kind names itself and the known ones, and every
path (start, reload, a reused encoder session) gets the same scorer for the same station."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bench.bench_deploy import encoder_only_copy
from edge.errors import PackError, StateError
from edge.line.synthetic import SyntheticLine
from edge.pack import Pack, load_pack
from edge.scoring.decide import image_score
from edge.scoring.factory import build_scorer
from edge.scoring.registry import SCORER_KINDS, ScorerRequest, register_scorer
from edge.inference.features import FeatureExtractor
from edge.scoring.scorer import Scorer, anomaly_maps
from edge.station.enrollment import build_state


class FarthestPatchScorer(Scorer):
    """A tiny scorer kind: each patch's distance to the bank, doubled (any map the decide stage takes)."""

    def anomaly_maps(self, features):
        return 2 * anomaly_maps(self.bank, features, self.pack)


def build_farthest_patch_scorer(request: ScorerRequest) -> FarthestPatchScorer:
    state = request.state
    return FarthestPatchScorer(request.pack, state.bank, 2 * state.calibration.threshold,
                               request.extractor or FeatureExtractor(request.pack, request.backend),
                               calibration=state.calibration)


def pack_of_kind(pack: Pack, kind: str) -> Pack:
    """The pack with its scorer kind renamed (as a pack.yaml naming that kind would load)."""
    scorer = pack.scorer.model_copy(update={"kind": kind})
    return Pack(pack.root, pack.manifest.model_copy(update={"scorer": scorer}), pack.manifest_sha256)


@pytest.fixture(scope="module")
def state(default_pack):
    return build_state(default_pack, SyntheticLine(seed=4).good(6), seed=0, quiet=True, few_shot=False)


@pytest.fixture
def farthest_patch_kind():
    register_scorer("farthest_patch")(build_farthest_patch_scorer)
    yield "farthest_patch"
    SCORER_KINDS.pop("farthest_patch")


def test_a_registered_kind_is_built_for_a_pack_naming_it(default_pack, state, farthest_patch_kind):
    pack = pack_of_kind(default_pack, farthest_patch_kind)
    scorer = build_scorer(pack, state)
    assert type(scorer) is FarthestPatchScorer and scorer.threshold == 2 * state.calibration.threshold
    frame = SyntheticLine(seed=9).good(1)[0]
    bank_result = build_scorer(default_pack, state).score_one(frame)
    result = scorer.score_one(frame)
    np.testing.assert_allclose(result.anomaly_map, 2 * bank_result.anomaly_map, rtol=1e-5)
    assert result.score == pytest.approx(image_score(result.anomaly_map, pack.scorer.top_fraction))
    # The factory's checks hold for every kind: a state calibrated with other numerics is refused.
    other = dataclasses.replace(state, calibration=dataclasses.replace(state.calibration, backend="tensorrt",
                                                                       precision="fp16"))
    with pytest.raises(StateError, match="calibrated with tensorrt fp16"):
        build_scorer(pack, other)


def test_a_kind_is_registered_once(farthest_patch_kind):
    with pytest.raises(ValueError, match="'farthest_patch' is already registered"):
        register_scorer(farthest_patch_kind)(lambda request: None)


def test_an_unknown_kind_names_itself_and_the_known_ones(default_pack, state):
    with pytest.raises(PackError, match=r"scorer kind 'no_such_scorer' has no scorer \(known kinds: anomalygpt, "
                                        r"memory_bank, student, tiled\)"):
        build_scorer(pack_of_kind(default_pack, "no_such_scorer"), state)


def test_reload_gets_the_start_scorer_with_the_encoder_session_it_replaces(default_pack, state):
    start = build_scorer(default_pack, state, None, kind="auto", cpu_scoring="numpy")
    reloaded = build_scorer(default_pack, state, None, kind="auto", cpu_scoring="numpy", replacing=start)
    assert type(reloaded) is type(start) is Scorer and reloaded.extractor is start.extractor
    assert type(reloaded.bank) is type(start.bank) and reloaded.threshold == start.threshold


def test_a_pack_yaml_naming_a_registered_kind_loads_and_scores_with_it(default_pack_dir, state, farthest_patch_kind,
                                                                        tmp_path):
    def name_the_kind(manifest):
        manifest["scorer"]["kind"] = farthest_patch_kind

    pack = load_pack(encoder_only_copy(Path(default_pack_dir), tmp_path / "pack", load_pack(default_pack_dir).model_id,
                                       edit=name_the_kind))
    assert pack.scorer.kind == farthest_patch_kind
    assert type(build_scorer(pack, state)) is FarthestPatchScorer
    SCORER_KINDS.pop(farthest_patch_kind)  # the same pack where nothing registered the kind: a named refusal
    try:
        with pytest.raises(PackError, match=f"scorer kind '{farthest_patch_kind}' has no scorer"):
            build_scorer(pack, state)
    finally:
        register_scorer(farthest_patch_kind)(build_farthest_patch_scorer)


def test_a_malformed_scorer_kind_is_refused_when_the_pack_loads(default_pack_dir, tmp_path):
    def bad_kind(manifest):
        manifest["scorer"]["kind"] = "Memory Bank!"

    with pytest.raises(PackError, match=r"scorer\.kind"):
        load_pack(encoder_only_copy(Path(default_pack_dir), tmp_path / "pack", "bad-kind", edit=bad_kind))
