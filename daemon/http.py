"""The daemon's own HTTP endpoint: ``/metrics`` (Prometheus), ``/status`` (JSON), ``/healthz``.

``POST /admin/<action>`` is the operator API (daemon/admin.py): authenticated
there, carried out by the supervisor's loop.

``/healthz`` answers 200 while the daemon is healthy and 503 with the reasons
while it is degraded (a component failing for longer than
``supervision.degraded_after_s``): monitoring sees the outage, and the daemon
keeps running through it. ``/livez`` answers 503 only when the supervisor's
loop has stopped turning (``supervision.liveness_timeout_s``): the one state a
restart cures, so it is what a Kubernetes liveness probe asks.
"""

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from everlearn.daemon.admin import MAX_BODY


class StatusServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, status: Callable[[], dict[str, Any]],
                 health: Callable[[], list[str]] = list,
                 live: Callable[[], list[str]] = list,
                 admin: Callable[[str, bytes, str | None], tuple[int, dict[str, Any]]] | None = None):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0].rstrip("/")
                if path == "/metrics":
                    self._send(200, generate_latest(outer.registry), CONTENT_TYPE_LATEST)
                elif path == "/status":
                    self._send(200, json.dumps(outer.status(), default=str).encode(), "application/json")
                elif path in ("/healthz", "/livez"):
                    problems = outer.health() if path == "/healthz" else outer.live()
                    body = json.dumps({"ok": not problems, **({"degraded": problems} if problems else {})}).encode()
                    self._send(503 if problems else 200, body, "application/json")
                else:
                    self._send(404, b'{"error": "try /metrics, /status, /healthz or /livez"}', "application/json")

            def do_POST(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0].rstrip("/")
                if not path.startswith("/admin/") or outer.admin is None:
                    self._send(404, b'{"error": "POST goes to /admin/<action> (rollback, promote, pause, resume)"}', "application/json")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._send(413, json.dumps({"error": f"admin bodies are at most {MAX_BODY} bytes"}).encode(), "application/json")
                    return
                code, answer = outer.admin(path.removeprefix("/admin/"), self.rfile.read(length), self.headers.get("Authorization"))
                self._send(code, json.dumps(answer, default=str).encode(), "application/json",
                           {"WWW-Authenticate": 'Bearer realm="everlearn-admin"'} if code == 401 else None)

            def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds: keep the console clean
                pass

        self.registry = registry
        self.status = status
        self.health, self.live = health, live
        self.admin = admin
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="everlearn-status", daemon=True)

    def start(self) -> "StatusServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
