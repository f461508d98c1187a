"""Calibration: running data through observers, PTQ algorithms, BN re-estimation."""
from .data import batch_to_args, run_calibration

__all__ = ["run_calibration", "batch_to_args"]
