"""Knowing a DirectorySource's open files by identity, not by name, from one listing to the next.

``reconcile`` matches the open files to a new listing: the same file under its name
(grown, or truncated: ``file_truncated``), moved to another name (``file_renamed``: the
same inode or ETag, or else the same first bytes), other content under the name
(``file_replaced``), or gone (``file_deleted``); names new after their directory's
watermark become open files at offset 0. ``refresh_fp`` keeps each file's fingerprint
(a hash of its first bytes, up to ``FP_MAX``) growing with what was read, which is how
a file is recognised where the store's identity says nothing (memory://, a copy).
A compressed file's offset counts decompressed bytes, so it is never compared with a
size: once reading it began, another size under it is other content (``file_replaced``).
"""

import dataclasses

from everlearn.daemon.listing import (
    FP_MAX,
    Changed,
    Listing,
    Stat,
    fingerprint,
    is_compressed,
    suffix,
    top,
)
from everlearn.daemon.source_events import event_fields
from everlearn.daemon.source_position import OpenFile, Watermark
from everlearn.daemon.stores import Reader, Store

RENAME_CANDIDATES = 8  # new files, closest in size, whose first bytes are compared with a vanished file's


class Retry(Exception):
    """A file moved while it was being identified: the poll returns nothing, the next one looks again."""


def content_ok(store: Store, f: OpenFile, s: Stat) -> bool:
    """Whether ``s`` starts with the bytes ``f`` was fingerprinted on (always, when nothing was)."""
    if f.fpn == 0:
        return True
    if s.size < f.fpn:
        return False
    try:
        with store.open(s) as r:
            r.seek(0)
            return fingerprint(r.read(f.fpn)) == f.fp
    except (Changed, FileNotFoundError) as e:
        raise Retry from e


def shrunk(rel: str, f: OpenFile, s: Stat) -> bool:
    """Smaller than what was read of it: a plain file's size below its offset (a compressed one's offset is decompressed)."""
    return not is_compressed(rel) and s.size < f.offset


def unread(rel: str, f: OpenFile, size: int) -> int:
    """Bytes of ``size`` not read yet; a compressed file: all of them until it was read to its end, none after."""
    if is_compressed(rel):
        return 0 if f.end else size
    return max(0, size - f.offset)


def last_size(rel: str, f: OpenFile) -> int:
    """The size a file had when last seen, as far as its state tells (after a restart, before any listing)."""
    return (f.size or 0) if is_compressed(rel) else f.offset


def replaced(rel: str, f: OpenFile, s: Stat) -> tuple:
    """Other content under ``rel``: reported, and never read from its start (nothing is trained twice)."""
    event = ("file_replaced", {**event_fields(rel, s.id, f.offset, s.size, s.size), "old_identity": f.id})
    if is_compressed(rel):
        f.end, f.size = True, s.size
    else:
        f.offset = s.size
    f.fp, f.fpn = "", 0
    return event


def reconcile(store: Store, current: dict[str, OpenFile], dirs: dict[str, Watermark], listing: Listing,
              now: float) -> tuple[dict[str, OpenFile], list]:
    """Match the open files to what the listing shows: same name, renamed, truncated, replaced, deleted; add new ones."""
    old = {rel: dataclasses.replace(f, stat=None) for rel, f in current.items()}
    unclaimed, files, events, lost, freed = dict(listing.stats), {}, [], [], set()
    checked: dict[tuple[str, str], bool] = {}

    def same(rel: str, s: Stat) -> bool:  # one read at most per (open file, candidate) and poll
        if (rel, s.rel) not in checked:
            checked[rel, s.rel] = content_ok(store, old[rel], s)
        return checked[rel, s.rel]

    def claim(rel: str, f: OpenFile, s: Stat) -> None:
        if s.sig != f.sig:
            f.changed_at = now
        if f.size is not None and s.size != f.size:  # a compressed file changed since reading it began
            events.append(replaced(rel, f, s))
        if shrunk(rel, f, s):
            events.append(("file_truncated", event_fields(rel, s.id, f.offset, s.size, f.offset - s.size)))
            f.offset = s.size
            if f.fpn > s.size:
                f.fp, f.fpn = "", 0
        f.sig, f.id, f.stat = s.sig, s.id, s
        files[rel] = f
        del unclaimed[rel]

    def renamed(rel: str, f: OpenFile, s: Stat) -> None:
        events.append(("file_renamed", {**event_fields(s.rel, s.id, f.offset, s.size, unread(rel, f, s.size)),
                                        "from": rel, "to": s.rel}))
        freed.add(rel)
        claim(s.rel, f, s)

    for rel, f in sorted(old.items()):
        s = unclaimed.get(rel)
        if s is not None and (s.sig == f.sig and s.id == f.id or f.id is not None and s.id == f.id and (
                store.id_is_content or shrunk(rel, f, s) or same(rel, s))):
            claim(rel, f, s)  # unchanged, or the same file (inode / ETag) changed: grown or truncated
        else:
            lost.append(rel)
    by_id: dict[str, list[Stat]] = {}
    for s in unclaimed.values():
        if s.id is not None:
            by_id.setdefault(s.id, []).append(s)
    still = []
    for rel in lost:  # moved: the same inode or ETag under another name
        f = old[rel]
        match = next((s for s in by_id.get(f.id or "", []) if s.rel in unclaimed and s.rel != rel and (
            store.id_is_content or same(rel, s))), None)
        if match is not None:
            renamed(rel, f, match)
        else:
            still.append(rel)
    lost, still = still, []
    for rel in lost:  # the same content under the same name (rewritten longer: s3 "appends", atomic replace)
        f, s = old[rel], unclaimed.get(rel)
        if s is not None and not shrunk(rel, f, s) and same(rel, s):
            claim(rel, f, s)
        else:
            still.append(rel)
    for rel in still:
        f, s = old[rel], unclaimed.get(rel)
        if f.fpn:  # moved where only the content tells (memory://, a copy between devices, rotation)
            prev = current[rel].stat
            was = prev.size if prev is not None else last_size(rel, f)
            least = f.fpn if is_compressed(rel) else max(f.offset, f.fpn)
            near = sorted((t for t in unclaimed.values() if t.rel != rel and t.size >= least and suffix(t.rel) == suffix(rel)),
                          key=lambda t: abs(t.size - was))
            match = next((t for t in near[:RENAME_CANDIDATES] if same(rel, t)), None)  # bounded reads
            if match is not None:
                renamed(rel, f, match)
                continue
        if s is None:
            prev = current[rel].stat
            size = prev.size if prev is not None else last_size(rel, f)
            events.append(("file_deleted", event_fields(rel, f.id, f.offset, size, unread(rel, f, size))))
        elif shrunk(rel, f, s):
            claim(rel, f, s)
        else:  # other content under this name
            events.append(replaced(rel, f, s))
            claim(rel, f, s)
    for rel, s in sorted(unclaimed.items()):
        d = dirs.get(top(rel))
        if d is None or rel > d.after or rel in freed:
            files[rel] = OpenFile(0, s.id, "", 0, now, now, s.sig, s)
    return files, events


def refresh_fp(r: Reader, f: OpenFile) -> None:
    """Fingerprint the file's first bytes read so far (up to FP_MAX), doubling its length as the file grows."""
    want = min(FP_MAX, f.offset)
    if want > f.fpn and (f.fpn == 0 or want >= 2 * f.fpn or want == FP_MAX):
        head = r.head[:want] if len(r.head) >= want else b""
        if not head:
            r.seek(0)
            head = r.read(want)
        f.fp, f.fpn = fingerprint(head), len(head)
