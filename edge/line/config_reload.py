"""What a reload of the station configuration (SIGHUP or the `reload` command) applies in place.

`RELOADABLE` lists the keys the running stages read afresh; `changed_keys` and `needs_restart` tell the
reply which keys changed and which of them wait for a restart; `with_reloaded` is the running config with
the reloadable keys taken from the new one. Reading and validating the file is edge.line.config's.
"""
from __future__ import annotations

from edge.line.config import StationConfig

# Keys SIGHUP applies in place; everything else needs a restart.
# Only keys the running stages read afresh (or that reload() pushes to them) belong here.
RELOADABLE = ("trigger.interval_s", "storage.keep_images", "storage.retention_days", "storage.disk_budget_mb",
              "storage.min_free_mb",
              "mqtt.heatmap", "health", "log_level", "station.mm_per_pixel", "state")


def with_reloaded(old: StationConfig, new: StationConfig) -> StationConfig:
    """`old` with the RELOADABLE keys taken from `new`; everything else stays as it runs."""
    for key in RELOADABLE:
        section, _, name = key.partition(".")
        value = getattr(new, section)
        if name:
            value = getattr(old, section).model_copy(update={name: getattr(value, name)})
        old = old.model_copy(update={section: value})
    return old


def changed_keys(old: StationConfig, new: StationConfig) -> list[str]:
    """Dotted keys whose values differ, one level into sections."""
    a, b = old.model_dump(), new.model_dump()
    keys = []
    for k in b:
        if a[k] == b[k]:
            continue
        if isinstance(b[k], dict) and isinstance(a[k], dict):
            keys += [f"{k}.{sub}" for sub in b[k] if a[k].get(sub) != b[k].get(sub)]
        else:
            keys.append(k)
    return keys


def needs_restart(keys: list[str]) -> list[str]:
    return [k for k in keys if not any(k == r or k.startswith(r + ".") for r in RELOADABLE)]
