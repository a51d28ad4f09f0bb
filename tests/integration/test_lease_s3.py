"""The store lease (daemon/lease.py) on a real S3-compatible server (moto): conditional create, If-Match renewal, takeover."""

import json
import os
import socket
import time

import boto3
import pytest
import s3fs
from botocore.exceptions import ClientError

from everlearn.daemon.lease import LEASE, StoreLease
from everlearn.errors import RunLockedError
from everlearn.learners import CheckpointStore

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class _NoRenewals:
    """In place of a lease's stop event: the renew thread ends at once; ``renew_once`` runs one renewal."""

    def __init__(self, renewals: int = 0):
        self.renewals = renewals

    def wait(self, timeout=None) -> bool:
        self.renewals -= 1
        return self.renewals < 0

    def set(self) -> None:
        self.renewals = 0

    def clear(self) -> None:
        pass


def manual(store: CheckpointStore, clock: Clock, ttl_s: float = 30.0) -> StoreLease:
    lease = StoreLease(store, ttl_s, clock=clock)
    lease._stop = _NoRenewals()
    return lease


def renew_once(lease: StoreLease) -> None:
    lease._stop = _NoRenewals(1)
    lease._renew_loop()


@pytest.fixture
def store(s3_bucket):
    url, opts = s3_bucket
    return CheckpointStore(f"{url}/run/checkpoints", opts)


@pytest.fixture
def boto(s3_bucket):
    _, opts = s3_bucket
    return boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id=opts["key"],
                        aws_secret_access_key=opts["secret"], region_name="us-east-1")


def _key(store: CheckpointStore) -> tuple[str, str]:
    bucket, _, prefix = store.root.partition("/")
    return bucket, f"{prefix}/{LEASE}"


def read_lease(boto, store) -> tuple[dict, str]:
    bucket, key = _key(store)
    got = boto.get_object(Bucket=bucket, Key=key)
    return json.loads(got["Body"].read()), got["ETag"]


def foreign_write(boto, store, owner: str = "someone-else", **fields) -> str:
    """Another daemon writes the lease (unconditionally); returns the new ETag."""
    body = {"host": "other-host", "pid": 4242, "owner": owner, "expires_unix": 9e12, **fields}
    bucket, key = _key(store)
    return boto.put_object(Bucket=bucket, Key=key, Body=json.dumps(body).encode())["ETag"]


def test_the_conditional_create_refuses_a_second_daemon(store, boto):
    clock = Clock()
    a = manual(store, clock)
    a.acquire()
    body, etag = read_lease(boto, store)
    assert body["owner"] == a.owner and body["pid"] == os.getpid()
    with pytest.raises(RunLockedError) as err:
        manual(store, clock).acquire()
    msg = str(err.value)
    assert f"checkpoint store {store.url} is leased by another everlearn daemon" in msg
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in msg and "or use another checkpoint.url" in msg
    assert read_lease(boto, store) == (body, etag)  # untouched
    a.release()
    bucket, key = _key(store)
    with pytest.raises(ClientError):
        boto.head_object(Bucket=bucket, Key=key)


def test_a_refused_create_is_recognised_when_the_server_does_not_name_the_condition(store, monkeypatch):
    """s3fs raises FileExistsError only when the 412 names If-None-Match; other servers give a plain OSError(EINVAL)."""
    clock = Clock()
    a = manual(store, clock)
    a.acquire()
    real = store.fs.pipe_file

    def without_condition(path, value, **kwargs):
        try:
            return real(path, value, **kwargs)
        except OSError as e:
            cause = e.__cause__
            assert isinstance(cause, ClientError), e
            response = {**cause.response, "Error": {k: v for k, v in cause.response["Error"].items() if k != "Condition"}}
            raise s3fs.errors.translate_boto_error(ClientError(response, cause.operation_name))  # noqa: B904 its cause is set

    monkeypatch.setattr(store.fs, "pipe_file", without_condition)
    with pytest.raises(RunLockedError, match="leased by another everlearn daemon"):
        manual(store, clock).acquire()
    monkeypatch.undo()
    a.release()


def test_renewal_writes_only_over_the_version_it_read(store, boto, monkeypatch):
    """If-Match: a lease another daemon wrote between the holder's read and its write is not overwritten."""
    clock = Clock()
    a = manual(store, clock)
    a.acquire()
    writes = []
    real_pipe = store.fs.pipe_file
    monkeypatch.setattr(store.fs, "pipe_file", lambda path, value, **kw: (writes.append(kw), real_pipe(path, value, **kw))[1])
    _, etag = read_lease(boto, store)
    clock.t += 10
    renew_once(a)  # a plain renewal
    assert writes == [{"IfMatch": etag}]
    body, _ = read_lease(boto, store)
    assert body["owner"] == a.owner and body["expires_unix"] == pytest.approx(clock.t + 30)

    real_read = a._read

    def read_then_someone_writes():
        got = real_read()
        foreign_write(boto, store, owner="intruder")
        return got

    monkeypatch.setattr(a, "_read", read_then_someone_writes)
    renew_once(a)  # its conditional write fails: the intruder's lease stays
    monkeypatch.setattr(a, "_read", real_read)
    assert read_lease(boto, store)[0]["owner"] == "intruder"
    renew_once(a)
    assert a.lost and "was taken by host other-host pid 4242" in a.lost
    assert read_lease(boto, store)[0]["owner"] == "intruder"


def test_a_lease_overwritten_by_someone_else_is_lost(store, boto):
    clock = Clock()
    a = manual(store, clock)
    a.acquire()
    foreign_write(boto, store)
    renew_once(a)
    assert a.lost and "other-host" in a.lost
    a.release()  # not its lease any more: left in place
    assert read_lease(boto, store)[0]["owner"] == "someone-else"


def test_an_expired_lease_is_taken_over(store, boto):
    clock = Clock()
    a, b = manual(store, clock), manual(store, clock)
    a.acquire()
    clock.t += 31  # a stopped renewing
    b.acquire()
    assert read_lease(boto, store)[0]["owner"] == b.owner
    renew_once(a)
    assert a.lost
    renew_once(b)
    assert b.lost is None and read_lease(boto, store)[0]["owner"] == b.owner
    b.release()


def test_of_two_daemons_taking_over_one_expired_lease_one_wins(store, boto):
    clock = Clock()
    a = manual(store, clock)
    a.acquire()
    clock.t += 31
    b, c = manual(store, clock), manual(store, clock)
    stale = c._read()  # c looked at the expired lease ...
    b.acquire()  # ... b took it over meanwhile
    c._read = lambda: stale  # c decides on what it saw
    with pytest.raises(RunLockedError, match="leased by another everlearn daemon"):
        c.acquire()
    assert read_lease(boto, store)[0]["owner"] == b.owner


def test_the_renew_thread_keeps_the_lease_on_s3(store, boto):
    clock = Clock()
    a = StoreLease(store, ttl_s=0.6, clock=clock)  # renews every 0.2 s
    a.acquire()
    try:
        clock.t += 1000
        deadline = time.monotonic() + 10
        while read_lease(boto, store)[0]["expires_unix"] < clock.t and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_lease(boto, store)[0]["expires_unix"] == pytest.approx(clock.t + 0.6)
        assert a.lost is None
    finally:
        a.release()


def test_a_lease_renewed_while_a_taker_reads_it_is_not_overwritten(store, boto, monkeypatch):
    """The taker decides on the content it read; its If-Match must name that version, not a newer one."""
    clock = Clock()
    a = manual(store, clock)
    a.acquire()
    clock.t += 31  # expired, as far as the taker can tell ...
    real_cat = store.fs.cat_file

    def cat_then_the_holder_renews(path, *args, **kwargs):
        data = real_cat(path, *args, **kwargs)
        monkeypatch.setattr(store.fs, "cat_file", real_cat)
        foreign_write(boto, store, owner=a.owner)  # ... but its holder renews right after the read
        return data

    monkeypatch.setattr(store.fs, "cat_file", cat_then_the_holder_renews)
    with pytest.raises(RunLockedError):
        manual(store, clock).acquire()
    assert read_lease(boto, store)[0]["owner"] == a.owner
