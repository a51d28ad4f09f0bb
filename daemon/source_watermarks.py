"""Each directory's watermark: which files a DirectorySource has finished with, and which arrived late.

After every poll ``advance`` moves each top-level directory's watermark past the files
read to their end and first seen ``close_after_s`` ago (a file still growing holds it),
and closes the files below it that were unchanged for ``close_after_s``: they are no
longer listed or read. A new name at or below the watermark is reported ``file_late``
once and not read; it is noticed when the digest of the names up to the watermark
changes (stores that list those names: local, memory://; not s3).
"""

import logging

from everlearn.daemon.listing import Listing, digest, top
from everlearn.daemon.source_events import event_fields
from everlearn.daemon.source_position import OpenFile, Watermark, is_done
from everlearn.daemon.stores import Store

log = logging.getLogger("everlearn.daemon.sources")  # the logger of DirectorySource, whose state this is


def advance(store: Store, files: dict[str, OpenFile], dirs: dict[str, Watermark], listing: Listing, now: float,
            close_after_s: float, emit, url: str) -> None:
    """Move each directory's watermark past files first seen close_after_s ago; close finished files below it; report late ones.

    Updates ``files`` (closed ones are removed) and ``dirs`` in place; ``emit(name, fields)`` reports.
    """
    unsure = set()  # directories whose late check failed: their digest stays, the check runs again
    if listing.below is not None:
        for d, names in listing.below.items():
            state = dirs.get(d)
            if state is None or not state.digest or digest(names) == state.digest:
                continue
            untracked = [n for n in names if n not in files]
            try:
                stats = store.stat(untracked)
            except Exception as e:  # noqa: BLE001 a report only: try again next poll
                log.warning("source %s: checking for late files failed: %s", url, e)
                unsure.add(d)
                continue
            late = [s for _, s in sorted(stats.items()) if s.ts is not None and s.ts > state.changed]
            for s in late:
                emit("file_late", {**event_fields(s.rel, s.id, 0, s.size, s.size), "watermark": state.after})
            state.changed = max([state.changed] + [s.ts for s in late])  # reported once
    by_dir: dict[str, list[str]] = {}
    for rel in sorted(files):
        by_dir.setdefault(top(rel), []).append(rel)
    for d, rels in by_dir.items():
        state = dirs.setdefault(d, Watermark())
        for rel in rels:  # past files read to their end (a backlog stays listed) and seen long enough
            if rel > state.after:
                if now - files[rel].first_seen < close_after_s or not is_done(rel, files[rel]):
                    break
                state.after = rel
        for rel in rels:
            f = files[rel]
            if rel <= state.after and now - f.changed_at >= close_after_s and is_done(rel, f):
                del files[rel]
                state.changed = max(state.changed, f.stat.ts or 0.0)
    if listing.below is not None:
        for d, state in dirs.items():
            if d in unsure:
                continue
            names = set(listing.below.get(d, [])) | {r for r in listing.stats if top(r) == d}
            state.digest = digest(sorted(n for n in names if n <= state.after)) if state.after else ""
