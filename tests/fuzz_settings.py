"""How many examples the fuzz tests try: a bounded, repeatable number in the suite, and
``FEATX_FUZZ_SCALE`` times more, freshly random, in a long run (``benchmarks/fuzz.py``)."""

import os

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("FEATX_FUZZ_SCALE", "1")))


def fuzz_settings(examples: int, **overrides) -> settings:
    """Hypothesis settings for a fuzz test that tries ``examples`` inputs in the suite."""
    return settings(max_examples=examples * SCALE, deadline=None, database=None,
                    derandomize=SCALE == 1, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture],
                    **overrides)
