"""anomaly-edge runtime: score frames against enrolled good parts, decide, publish, explain.

Never imports torch or the export toolchain; a model pack (see `edge.pack`) is its only input from export/.
"""
__version__ = "0.1.0"
