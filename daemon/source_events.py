"""The reports a DirectorySource makes about files it cannot read as usual, and their delivery.

The kinds (``file_renamed``, ``file_deleted``, ``file_truncated``, ``file_replaced``,
``file_late``, ``file_corrupt``) and what their ``bytes`` count are listed in
daemon/sources.py. Every report carries ``event_fields``; ``emit`` hands it to the
caller's callback, or logs it when there is none, and never lets a failing callback
stop the stream.
"""

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("everlearn.daemon.sources")  # the logger of DirectorySource, which these reports are about
Events = Callable[[str, dict[str, Any]], None]


def event_fields(rel: str, identity: str | None, offset: int, size: int, nbytes: int) -> dict[str, Any]:
    return {"file": rel, "identity": identity, "offset": offset, "size": size, "bytes": nbytes}


def emit(events: Events | None, url: str, name: str, fields: dict[str, Any]) -> None:
    if events is None:
        log.warning("source %s: %s %s", url, name, fields)
        return
    try:
        events(name, fields)
    except Exception:  # noqa: BLE001 a report must not stop the stream
        log.exception("source %s: the events callback failed on %s", url, name)
