"""quantkit's loggers. Library code never prints: it logs to ``logging.getLogger("quantkit.<part>")`` or returns a
report object, and the command line prints.

So that ``export_onnx(...)`` keeps showing its summary without any logging setup, the ``quantkit`` logger has one
handler of its own writing INFO and above to the current ``sys.stdout``, and does not propagate. To route quantkit's
messages through your own configuration instead::

    logging.getLogger("quantkit").handlers.clear()
    logging.getLogger("quantkit").propagate = True
"""
from __future__ import annotations

import logging
import sys


class _CurrentStdout(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stdout`` is when a record is emitted (it may be replaced after
    import, e.g. by a test's output capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stdout
        pass


def _library_logger() -> logging.Logger:
    root = logging.getLogger("quantkit")
    if not any(isinstance(h, _CurrentStdout) for h in root.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def get_logger(part: str) -> logging.Logger:
    """The logger of one part of quantkit (``get_logger("export")`` -> ``quantkit.export``)."""
    _library_logger()
    return logging.getLogger(f"quantkit.{part}")


__all__ = ["get_logger"]
