"""Command line: the only package that may import both the runtime and export/ (lazily)."""
