"""Figures every reader accepts (jq, JSON.parse, pandas): a figure not finite is `null` in JSON, `n/a` in a table."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return [finite(v) for v in value] if isinstance(value, list | tuple) else value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that writes `null` for a non-finite figure, never `NaN` or `Infinity`."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def known(value: Any) -> bool:
    """Whether `value` is a figure: not None (JSON brings NaN back as None) and finite."""
    return value is not None and math.isfinite(value)


def shown(value: Any, spec: str, scale: float = 1, unit: str = "") -> str:
    """A figure as table text (align the result in its column): `n/a` where it is unknown."""
    return f"{scale * value:{spec}}{unit}" if known(value) else "n/a"
