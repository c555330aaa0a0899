"""Station stage: what one station knows beside its pack. Its persisted state (bank, threshold, good
images), enrollment and hold-out calibration, learn mode, engine checks and pack deployment."""
