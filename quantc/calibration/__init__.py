"""Calibration: where the sample text comes from, and the Hessians it produces."""
from .data import calibration_tokens
from .hessian import CaptureInput, Hessian, run_until

__all__ = ["calibration_tokens", "CaptureInput", "Hessian", "run_until"]
