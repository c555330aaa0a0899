"""Scoring stage: features to anomaly maps and decisions. Memory bank, few-shot heads, threshold
calibration, the scorers (bank, student, AnomalyGPT, tiled), the one factory that builds them (factory,
registry) and overlays. Imports inference and the pack; never the station, the line or the explainer."""
