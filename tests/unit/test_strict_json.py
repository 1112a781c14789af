"""JSON that strict readers accept (strict_json.py)."""

import json
import math

import pytest
from support.launching import strict_loads

from cvae_dist.strict_json import dumps


def test_a_figure_that_is_not_finite_is_written_as_null_at_any_depth():
    text = dumps({"mfu": math.nan, "rates": [1.5, math.inf], "pair": (-math.inf, 2), "ok": 0.25, "n": 3, "s": "nan"})
    assert strict_loads(text) == {"mfu": None, "rates": [1.5, None], "pair": [None, 2], "ok": 0.25, "n": 3, "s": "nan"}


def test_the_strict_reader_refuses_what_plain_json_dumps_writes():
    with pytest.raises(AssertionError, match="NaN is not JSON"):
        strict_loads(json.dumps({"mfu": math.nan}))
