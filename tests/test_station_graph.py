"""The one station graph (edge.scoring.station_graph) on ONNX Runtime's CPU equals the NumPy path: maps within
1e-4, the same scores and verdicts, the bank an input (a new bank needs no new graph); the runtime's
scorer choice takes it only for what it covers, on the CPU."""
import cv2
import numpy as np
import pytest

from edge.inference.features import FeatureExtractor

from edge.scoring.scorer import Scorer
from edge.station.enrollment import build_state
from edge.scoring.station_graph import StationGraphScorer, map_matrices, supports
from edge.line.synthetic import SyntheticLine


@pytest.fixture(scope="module")
def bank_state(default_pack):
    line = SyntheticLine(seed=1)
    return build_state(default_pack, line.good(20), FeatureExtractor(default_pack), seed=0, quiet=True, few_shot=False)


def test_map_matrices_are_opencvs_resize_and_blur():
    grid = np.random.default_rng(2).random((28, 28)).astype(np.float32) * 40
    rows, cols = map_matrices((28, 28), (224, 200), 8.0)
    cpu = cv2.GaussianBlur(cv2.resize(grid, (200, 224), interpolation=cv2.INTER_LINEAR), (0, 0), 8)
    np.testing.assert_allclose(rows @ grid @ cols.T, cpu, atol=1e-4)


def test_the_station_graph_equals_the_numpy_path(default_pack, bank_state):
    assert supports(default_pack, bank_state.bank) is None
    numpy_path = Scorer(default_pack, bank_state.bank, bank_state.calibration.threshold, FeatureExtractor(default_pack))
    graph = StationGraphScorer(default_pack, bank_state.bank, bank_state.calibration.threshold)
    line = SyntheticLine(seed=7, defect_rate=0.5)
    frames = [p.image for p in line.parts(6)]
    frames += [cv2.resize(frames[0], (300, 180)), cv2.cvtColor(frames[1], cv2.COLOR_BGR2GRAY)]  # not square; grey
    want = numpy_path.anomaly_maps(numpy_path.extractor.patch_features(frames))
    maps, scores = graph.maps_and_scores(frames)
    assert np.abs(maps - want).max() <= 1e-4
    a, b = numpy_path.score(frames), graph.score(frames)
    np.testing.assert_allclose([r.score for r in b], [r.score for r in a], atol=1e-4)
    assert [r.verdict for r in b] == [r.verdict for r in a] and any(r.verdict == "anomalous" for r in a)


def test_the_bank_is_an_input_so_a_new_bank_needs_no_new_graph(default_pack, bank_state):
    graph = StationGraphScorer(default_pack, bank_state.bank, bank_state.calibration.threshold)
    other = build_state(default_pack, SyntheticLine(seed=5).good(18), FeatureExtractor(default_pack), seed=1,
                        quiet=True, few_shot=False).bank
    from edge.scoring.station_graph import bank_inputs

    graph.bank_feeds = bank_inputs(other)
    frames = [p.image for p in SyntheticLine(seed=9).parts(3)]
    want = Scorer(default_pack, other, 1.0, FeatureExtractor(default_pack)).anomaly_maps(
        FeatureExtractor(default_pack).patch_features(frames))
    assert np.abs(graph.maps_and_scores(frames)[0] - want).max() <= 1e-4


def test_the_station_scorer_takes_the_graph_only_where_it_covers_the_state(default_pack, bank_state, enrolled_state):
    from edge.station.state import load_state
    from edge.scoring.factory import build_scorer

    assert isinstance(build_scorer(default_pack, bank_state, None, kind="bank", cpu_scoring="station_graph"),
                      StationGraphScorer)
    assert type(build_scorer(default_pack, bank_state, None, kind="bank")) is Scorer  # numpy asked for
    few_shot = load_state(enrolled_state, default_pack)  # 16 references: a few-shot head, which the graph lacks
    assert few_shot.head is not None and "few-shot head" in supports(default_pack, few_shot.bank, few_shot.head)
    assert type(build_scorer(default_pack, few_shot, None, kind="bank", cpu_scoring="station_graph")) is Scorer
