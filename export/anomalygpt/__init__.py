"""`anomaly-edge export anomalygpt`: ImageBind-H + AnomalyGPT's delta + Vicuna -> an edge model pack."""
from .exporter import export_anomalygpt

__all__ = ["export_anomalygpt"]
