"""Evaluation: datasets in MVTec layout, metrics, the evaluation run, ROC plots and the demo."""
