"""No failpoint leaks from one scenario into the next. (``local_ray`` is in tests/conftest.py.)"""

import pytest


@pytest.fixture(autouse=True)
def _no_failpoints(no_failpoints):
    """Every scenario starts and ends with no failpoint armed, in this process and for its actors."""
    yield
