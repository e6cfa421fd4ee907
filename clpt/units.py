"""The unit of machine output: accuracies as fractions in [0, 1], numbers at 6 significant digits.

Every `--json` document and `clpt report --format json|csv` give accuracies as fractions (0.8315, not
83.15), rounded to 6 significant digits so float32 noise (0.8314999938011169) does not reach a script;
the tables for people show percent. Kept free of torch, so read-only commands stay light.
"""

from __future__ import annotations

import math


def machine_number(v: float) -> float:
    """A measurement as machine output gives it: 6 significant digits."""
    return float(f"{v:.6g}")


def machine(obj):
    """`obj` with every float at 6 significant digits, and non-finite numbers as None (JSON has neither)."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else machine_number(obj)
    if isinstance(obj, dict):
        return {k: machine(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [machine(v) for v in obj]
    return obj
