"""No failpoint leaks from one scenario into the next. (``local_ray`` is in tests/conftest.py.)"""

import pytest

from everlearn import failpoints


@pytest.fixture(autouse=True)
def _no_failpoints(monkeypatch):
    """Every scenario starts and ends with no failpoint armed, in this process and for its actors."""
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.reload("")
    yield
    failpoints.reload("")
