"""Calibration: where the sample text comes from, and the Hessians it produces."""
from .data import calibration_tokens
from .hessian import HessianCapture

__all__ = ["calibration_tokens", "HessianCapture"]
