"""The admin API: operator actions on a running daemon, behind a bearer token.

    POST /admin/rollback  {"version": N | null, "reason": "..."}   serve an earlier promoted version again
    POST /admin/promote   {"step": N, "reason": "..."}             serve a committed checkpoint, gates bypassed
    POST /admin/pause     {"reason": "..."}                        stop training (ingest stops at its bounded queue)
    POST /admin/resume                                             train again

Read endpoints (/metrics, /status, /healthz) stay open. An admin call without
``Authorization: Bearer <token>`` answers 401, one with another token 403. The
token comes from ``EVERLEARN_ADMIN_TOKEN``, else ``admin.token_file``, else
``<run_dir>/admin.token`` (created with mode 0600 on first start, so a local run
is protected without set-up and its owner's CLI finds the token). The token is
never logged, never a metric, never in /status.

The HTTP thread does not touch the run: it queues the action, and the
supervisor's loop runs it between steps (the loop owns every stage's state)
and hands back the answer.
"""

import hmac
import os
import queue
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from everlearn.errors import ConfigError

TOKEN_ENV = "EVERLEARN_ADMIN_TOKEN"
TOKEN_FILE = "admin.token"
ACTIONS = ("rollback", "promote", "pause", "resume")
MAX_BODY = 64 << 10  # an admin body is a few fields; refuse anything larger before reading it


class AdminConfig(BaseModel):
    """The operator API (rollback, promote, pause, resume) on the metrics port, behind a bearer token."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve the admin endpoints under /admin/ on metrics.host:metrics.port.")
    token_file: str | None = Field(None, description=f"File holding the bearer token (e.g. a mounted Kubernetes secret). Empty: the {TOKEN_ENV} environment variable, else <run_dir>/{TOKEN_FILE}, created on first start.")
    action_timeout_s: float = Field(300.0, gt=0, description="How long an admin call waits for the run to carry out the action (a rollback waits for every replica).")  # swaps take seconds; a judgement in flight or a recovery can take minutes


class AdminError(Exception):
    """An admin call the run refuses; ``status`` is the HTTP code (400 bad input, 404 unknown, 409 conflict)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def resolve_token(cfg: AdminConfig, run_dir: str | Path, env: Mapping[str, str] | None = None, create: bool = False) -> str | None:
    """The admin token: environment, then ``token_file``, then ``<run_dir>/admin.token`` (created when ``create``)."""
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip()
    path = Path(cfg.token_file) if cfg.token_file else Path(run_dir) / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        if cfg.token_file:
            raise ConfigError(f"admin.token_file {path} does not exist; create it with the token, or leave admin.token_file empty "
                              f"to use {TOKEN_ENV} or <run_dir>/{TOKEN_FILE}") from None
        if not create:
            return None
        return _create_token(path)
    if not token:
        raise ConfigError(f"the admin token file {path} is empty; write a token into it (e.g. `openssl rand -hex 32 > {path}`)")
    return token


def admin_endpoint(cfg: AdminConfig, run_dir: str | Path, actions: "AdminQueue",
                   count: Callable[[str, int], None]) -> "AdminEndpoint | None":
    """The endpoint the status server calls for ``POST /admin/*`` (None when ``admin.enabled`` is off); creates the token if needed."""
    if not cfg.enabled:
        return None
    return AdminEndpoint(resolve_token(cfg, run_dir, create=True), actions, count)


def _create_token(path: Path) -> str:
    """A new random token in a file only its owner can read (created exclusively: two starts agree on one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def authorize(token: str | None, header: str | None) -> tuple[int, str] | None:
    """None when ``header`` carries ``token``; else (401, why) without credentials or (403, why) with wrong ones."""
    if token is None:
        return 403, "the admin API has no token configured; set admin.token_file or " + TOKEN_ENV
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return 401, f"admin calls need 'Authorization: Bearer <token>' (the token is in {TOKEN_ENV}, admin.token_file or <run_dir>/{TOKEN_FILE})"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return 403, "the bearer token is not this daemon's admin token"
    return None


class AdminQueue:
    """Admin actions handed from HTTP threads to the supervisor's loop, one at a time, each with its answer."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._q: queue.Queue[tuple[str, dict[str, Any], Future]] = queue.Queue()
        self._lock = threading.Lock()  # one action at a time: a second caller waits for the first

    def call(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Queue ``action`` and wait for the loop's answer; AdminError from the action is re-raised."""
        if action not in ACTIONS:
            raise AdminError(404, f"no admin action {action!r}; the actions are: {', '.join(ACTIONS)}")
        with self._lock:
            done: Future = Future()
            self._q.put((action, body, done))
            try:
                return done.result(timeout=self.timeout_s)
            except TimeoutError:
                done.cancel()
                raise AdminError(503, f"the run did not carry out {action!r} within admin.action_timeout_s="
                                      f"{self.timeout_s} s (it may be recovering or stopping); see /status and try again") from None

    def run_pending(self, handler: Callable[[str, dict[str, Any]], dict[str, Any]]) -> None:
        """Run every queued action through ``handler`` (called by the loop between steps)."""
        while True:
            try:
                action, body, done = self._q.get_nowait()
            except queue.Empty:
                return
            if not done.set_running_or_notify_cancel():
                continue  # its caller gave up waiting
            try:
                done.set_result(handler(action, body))
            except Exception as e:  # noqa: BLE001 every failure goes back to the caller, never into the loop
                done.set_exception(e)

    def fail_pending(self, why: str) -> None:
        """Answer every queued action with 503 (the daemon is stopping)."""
        while True:
            try:
                _, _, done = self._q.get_nowait()
            except queue.Empty:
                return
            if done.set_running_or_notify_cancel():
                done.set_exception(AdminError(503, why))


class AdminEndpoint:
    """What the HTTP server calls for ``POST /admin/<action>``: authenticate, parse, queue, answer (code, JSON)."""

    def __init__(self, token: str | None, actions: AdminQueue, count: Callable[[str, int], None] = lambda action, code: None):
        self._token, self.actions, self.count = token, actions, count

    def __call__(self, action: str, body: bytes, authorization: str | None) -> tuple[int, dict[str, Any]]:
        code, answer = self._answer(action, body, authorization)
        self.count(action if action in ACTIONS else "(unknown)", code)  # a bounded label whatever the path
        return code, answer

    def _answer(self, action: str, body: bytes, authorization: str | None) -> tuple[int, dict[str, Any]]:
        refused = authorize(self._token, authorization)
        if refused is not None:
            return refused[0], {"error": refused[1]}
        try:
            args = _json_object(body)
            return 200, self.actions.call(action, args)
        except AdminError as e:
            return e.status, {"error": str(e)}

    def __repr__(self) -> str:  # the token never reaches a log through a repr
        return f"AdminEndpoint(token={'set' if self._token else 'none'})"


def _json_object(body: bytes) -> dict[str, Any]:
    import json

    if not body.strip():
        return {}
    try:
        args = json.loads(body)
    except ValueError as e:
        raise AdminError(400, f"the body is not JSON ({e}); send a JSON object such as {{\"version\": 3}} or nothing") from None
    if not isinstance(args, dict):
        raise AdminError(400, f"the body must be a JSON object, not {type(args).__name__}")
    return args
