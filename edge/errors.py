"""Errors that name what is wrong. Each carries enough context (file, key, value) to act on."""


class EdgeError(Exception):
    """Base of every error the runtime raises on purpose."""


class PackError(EdgeError):
    """A model pack is missing, malformed, or does not match its own manifest."""


class StateError(EdgeError):
    """Station state (memory bank, calibration) is missing, corrupt, or belongs to another pack."""


class ImageError(EdgeError):
    """An image or frame cannot be read or is unusable (empty, wrong type)."""


class DatasetError(EdgeError):
    """A dataset folder does not have the expected layout."""
