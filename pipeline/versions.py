"""Installed package versions, read from their metadata without importing them: for cache keys,
run records and model cards. One helper, so "absent" means the same everywhere."""

from __future__ import annotations

import importlib.metadata

ABSENT = "absent"


def version(*dists: str, default: str | None = ABSENT) -> str | None:
    """The version of the first of `dists` that is installed, else `default`."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return default
