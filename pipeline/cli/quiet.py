"""Silence TensorFlow's C++ start-up lines (printed before its logging is configured, so
TF_CPP_MIN_LOG_LEVEL cannot stop them) by muting file descriptor 2 while `tensorflow` first loads.
If the import fails, what it printed is shown after all."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

from pipeline.quiet_fd import muted_stderr


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        for finder in [f for f in sys.meta_path if isinstance(f, _QuietFinder)]:
            sys.meta_path.remove(finder)  # once is enough
        with muted_stderr():
            self.inner.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or "tensorflow" in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)  # find_spec alone imports nothing
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Mute TensorFlow's import-time chatter for the rest of this process."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
