"""Retrying (everlearn/retry.py): what counts as transient, backoff with jitter, and ``retry``."""

import errno
import types

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from everlearn import retry as retry_module
from everlearn.errors import ConfigError, SourceError, SourceUnavailable, StorageUnavailable
from everlearn.retry import Backoff, is_transient, retry

pytestmark = pytest.mark.unit


def client_error(status: int, code: str, op: str = "PutObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} from the server"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def raised(exc: BaseException) -> BaseException:
    """``exc`` after it was raised (so its traceback and context are set as in real code)."""
    try:
        raise exc
    except BaseException as e:
        return e


def chained(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


# -- is_transient ------------------------------------------------------------

@pytest.mark.parametrize("exc", [
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    BrokenPipeError(errno.EPIPE, "Broken pipe"),
    TimeoutError("timed out"),
    OSError(errno.EIO, "Input/output error"),  # s3fs turns most connection failures into plain OSErrors
    SourceUnavailable("the broker did not answer"),
    StorageUnavailable("the store did not answer"),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket"),
    ReadTimeoutError(endpoint_url="http://127.0.0.1:1/bucket"),
    client_error(503, "SlowDown"),
    client_error(500, "InternalError"),
    client_error(429, "TooManyRequests"),
], ids=lambda e: type(e).__name__ + (f"-{e.response['ResponseMetadata']['HTTPStatusCode']}" if isinstance(e, ClientError) else ""))
def test_transient(exc):
    assert is_transient(raised(exc))


@pytest.mark.parametrize("exc", [
    FileNotFoundError(errno.ENOENT, "No such file", "s3://b/k"),
    FileExistsError(errno.EEXIST, "exists"),
    PermissionError(errno.EACCES, "Permission denied"),
    IsADirectoryError(errno.EISDIR, "Is a directory"),
    NotADirectoryError(errno.ENOTDIR, "Not a directory"),
    client_error(404, "NoSuchKey", "GetObject"),
    client_error(403, "AccessDenied", "GetObject"),
    client_error(412, "PreconditionFailed"),
    ValueError("a bug"),
    KeyError("a bug"),
    SourceError("bad url"),
    ConfigError("bad config"),
], ids=lambda e: type(e).__name__ + (f"-{e.response['ResponseMetadata']['HTTPStatusCode']}" if isinstance(e, ClientError) else ""))
def test_not_transient(exc):
    assert not is_transient(raised(exc))


def test_aiohttp_connector_error_is_transient():
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey(**{f: None for f in ConnectionKey._fields} | {"host": "127.0.0.1", "port": 1, "is_ssl": False, "ssl": True})
    exc = aiohttp.ClientConnectorError(key, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    assert is_transient(raised(exc))
    assert is_transient(raised(aiohttp.ServerDisconnectedError()))


def test_a_cause_that_is_transient_makes_the_error_transient():
    # what s3fs and the stores do: a translated error whose __cause__ says what really happened
    assert is_transient(chained(SourceError("listing failed"), ConnectionResetError(errno.ECONNRESET, "reset")))
    assert is_transient(chained(OSError(errno.EIO, "translated"), client_error(503, "SlowDown")))
    assert is_transient(chained(RuntimeError("wrapped twice"), chained(ValueError("once"), TimeoutError())))


def test_a_permanent_error_with_a_permanent_cause_is_not_transient():
    # s3fs: FileNotFoundError translated from a 404 ClientError
    assert not is_transient(chained(FileNotFoundError(errno.ENOENT, "gone"), client_error(404, "NoSuchKey", "GetObject")))


def test_a_suppressed_context_is_not_followed():
    # ``raise X from None`` says: X is the whole story; a timeout it was raised while handling does not make it transient
    try:
        try:
            raise TimeoutError("the first attempt")
        except TimeoutError:
            raise ConfigError("source.url is not a URL") from None
    except ConfigError as e:
        exc = e
    assert isinstance(exc.__context__, TimeoutError) and exc.__suppress_context__
    assert not is_transient(exc)


def test_a_cycle_in_the_chain_ends():
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert not is_transient(a)


# -- Backoff -----------------------------------------------------------------

def test_each_delay_is_jittered_within_its_cap_and_never_zero():
    base, cap = 0.5, 4.0
    for seed in range(50):
        b = Backoff(base, cap, seed=seed)
        for n in range(8):
            limit = min(cap, base * 2**n)
            d = b.next_delay(now=0.0)
            assert 0.25 * limit <= d <= limit, (seed, n, d)


def test_delays_grow_then_stay_at_the_cap():
    base, cap = 1.0, 8.0
    backoffs = [Backoff(base, cap, seed=s) for s in range(300)]
    draws = [[b.next_delay() for _ in range(7)] for b in backoffs]
    per_n = list(zip(*draws, strict=True))
    for n, ds in enumerate(per_n):
        limit = min(cap, base * 2**n)
        # full range used: some draws near the cap, some near its lower quarter (jitter, not a constant)
        assert max(ds) > 0.9 * limit and min(ds) < 0.35 * limit, (n, min(ds), max(ds))
    means = [sum(ds) / len(ds) for ds in per_n]
    assert means[0] < means[1] < means[2] < means[3]  # doubling
    assert abs(means[4] - means[6]) < 0.1 * cap  # capped: 16 and 64 are both 8
    assert max(max(ds) for ds in per_n[3:]) <= cap


def test_a_long_run_of_failures_stays_at_the_cap():
    b = Backoff(0.5, 30.0, seed=1)
    delays = [b.next_delay() for _ in range(2000)]  # 2**2000 would overflow a float: the exponent is capped
    assert max(delays) <= 30.0 and min(delays[10:]) >= 7.5


def test_the_same_seed_gives_the_same_delays():
    a, b = Backoff(0.5, 30.0, seed=7), Backoff(0.5, 30.0, seed=7)
    assert [a.next_delay() for _ in range(10)] == [b.next_delay() for _ in range(10)]
    c = Backoff(0.5, 30.0, seed=8)
    assert [Backoff(0.5, 30.0, seed=7).next_delay() for _ in range(1)] != [c.next_delay()]


def test_reset_starts_again_from_the_base():
    b = Backoff(1.0, 100.0, seed=3)
    for _ in range(6):
        b.next_delay()
    assert b.failures == 6
    b.reset()
    assert b.failures == 0 and b.first_failure is None
    assert 0.25 <= b.next_delay() <= 1.0


def test_failing_for_counts_from_the_first_failure_of_a_run():
    b = Backoff(1.0, 10.0, seed=0)
    assert b.failing_for(now=50.0) == 0.0  # healthy
    b.next_delay(now=100.0)
    b.next_delay(now=104.0)  # a later failure does not move the start
    assert b.failing_for(now=107.5) == pytest.approx(7.5)
    b.reset()
    assert b.failing_for(now=200.0) == 0.0
    b.next_delay(now=300.0)
    assert b.failing_for(now=301.0) == pytest.approx(1.0)


# -- retry -------------------------------------------------------------------

class FakeTime:
    """``time.monotonic`` and ``time.sleep`` of the retry module: sleeping advances the clock."""

    def __init__(self):
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


@pytest.fixture
def fake_time(monkeypatch):
    t = FakeTime()
    monkeypatch.setattr(retry_module, "time", types.SimpleNamespace(monotonic=t.monotonic, sleep=t.sleep))
    return t


class Flaky:
    def __init__(self, errors: list[BaseException], result="done"):
        self.errors, self.result, self.calls = list(errors), result, 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def test_retry_succeeds_after_transient_failures(fake_time):
    fn = Flaky([ConnectionResetError("reset"), TimeoutError("slow"), client_error(503, "SlowDown")])
    seen: list[tuple[str, float]] = []
    backoff = Backoff(0.5, 30.0, seed=0)
    got = retry(fn, timeout_s=60, backoff=backoff, sleep=fake_time.sleep,
                on_retry=lambda e, d: seen.append((type(e).__name__, d)))
    assert got == "done" and fn.calls == 4
    assert [name for name, _ in seen] == ["ConnectionResetError", "TimeoutError", "ClientError"]
    assert fake_time.slept == [d for _, d in seen]  # on_retry is told the pause that follows
    for n, d in enumerate(fake_time.slept):
        assert 0.25 * 0.5 * 2**n <= d <= 0.5 * 2**n
    assert backoff.failures == 0 and backoff.first_failure is None  # success resets the backoff


def test_retry_returns_at_once_when_nothing_fails(fake_time):
    fn = Flaky([])
    assert retry(fn, timeout_s=1, sleep=fake_time.sleep) == "done"
    assert fn.calls == 1 and fake_time.slept == []


def test_retry_gives_up_after_timeout_and_raises_the_last_error(fake_time):
    errors = [TimeoutError(f"attempt {i}") for i in range(1000)]
    fn = Flaky(errors)
    with pytest.raises(TimeoutError) as info:
        retry(fn, timeout_s=20, backoff=Backoff(1.0, 4.0, seed=0), sleep=fake_time.sleep)
    assert str(info.value) == f"attempt {fn.calls - 1}"  # the last one
    assert sum(fake_time.slept) <= 20  # never sleeps past the deadline
    assert fn.calls == len(fake_time.slept) + 1
    assert fn.calls >= 5  # pauses of at most 4 s: it kept trying for most of the 20 s
    assert fake_time.now - 1000.0 > 20 - 4


def test_retry_raises_a_permanent_error_at_once(fake_time):
    for exc in (ValueError("bug"), FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "denied"),
                client_error(404, "NoSuchKey", "GetObject")):
        fn = Flaky([exc])
        calls: list = []
        with pytest.raises(type(exc)):
            retry(fn, timeout_s=60, sleep=fake_time.sleep, on_retry=lambda e, d: calls.append(e))  # noqa: B023
        assert fn.calls == 1 and calls == [] and fake_time.slept == []


def test_retry_does_not_call_on_retry_when_it_gives_up(fake_time):
    fn = Flaky([TimeoutError("a"), TimeoutError("b")])
    seen: list = []
    with pytest.raises(TimeoutError, match="a"):
        # the first pause (0.25 to 1 s at base 1) already passes a deadline 0.1 s away
        retry(fn, timeout_s=0.1, backoff=Backoff(1.0, 1.0, seed=0), sleep=fake_time.sleep, on_retry=lambda e, d: seen.append(e))
    assert fn.calls == 1 and seen == [] and fake_time.slept == []
