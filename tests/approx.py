"""Comparing plain-data structures (a calibration's `to_dict`) whose floats were summed in another order."""
import pytest


def close(a, b, tol: float = 1e-12) -> bool:
    """Equal structures whose floats agree to `tol` (relative and absolute)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=tol, abs=tol)
    return a == b
