"""A TCP proxy in front of a server on loopback, to cut it off the way networks fail.

``up``: bytes flow. ``reset``: new connections are refused and open ones cut
(connection reset). ``blackhole``: connections are accepted and held, but no
byte flows either way (the peer waits until its own timeout).
"""

import contextlib
import socket
import threading


class Proxy:
    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.mode = "up"
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def up(self) -> bool:
        return self.mode == "up"

    @up.setter
    def up(self, value: bool) -> None:
        self.set("up" if value else "reset")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "reset":
                client.close()
                continue
            with self._lock:
                self.conns.append(client)
            if self.mode == "blackhole":
                continue  # held open, never answered
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.conns.append(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                if self.mode == "blackhole":
                    continue  # swallowed
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _cut(self) -> None:
        with self._lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def set(self, mode: str) -> None:
        """Switch to ``up``, ``reset`` or ``blackhole``; open connections are cut on every switch."""
        assert mode in ("up", "reset", "blackhole"), mode
        self.mode = mode
        self._cut()

    def down(self) -> None:
        self.set("reset")

    def close(self) -> None:
        self.set("reset")
        self.sock.close()
