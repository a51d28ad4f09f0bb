"""A DirectorySource's state and its JSON position: the files still open and each directory's watermark.

``encode`` writes, and ``decode`` reads back,
``{"format": 2, "dirs": {dir: {"after", "digest", "changed"}}, "files": {rel: {"offset", "id", "fp", "fpn"}}}``
with an entry only for open files (``id`` only when known, ``fp``/``fpn`` only once
fingerprinted). ``offset`` counts the bytes read, **decompressed** bytes for a compressed
file (``*.gz``, ``*.zst``), whose ``fp`` is still of its first compressed bytes; once reading
a compressed file began its entry also has ``size`` (its compressed size then) and, once
it was read to its end or given up (damaged, replaced), ``"end": true``.
``decode`` also takes the format before 2, ``{"offsets": {rel: n}}``:
its files' identities are learned when they are first seen. A position this source
did not write is a ``SourceError``.
"""

import dataclasses
from typing import Any

from everlearn.daemon.listing import Stat, is_compressed, is_txt
from everlearn.errors import SourceError

FORMAT = 2


@dataclasses.dataclass
class OpenFile:
    """An open file: read up to ``offset`` (decompressed bytes if compressed); identity ``id`` and ``fp`` (hash of its first ``fpn`` bytes)."""

    offset: int = 0
    id: str | None = None
    fp: str = ""
    fpn: int = 0
    first_seen: float = 0.0
    changed_at: float = 0.0  # clock time its size/mtime last changed
    sig: tuple | None = None
    stat: Stat | None = None  # this poll's
    size: int | None = None  # a compressed file: its (compressed) size when reading it began; another size is other content
    end: bool = False  # a compressed file: read to its end, or given up (damaged, replaced): never read again


@dataclasses.dataclass
class Watermark:
    """A top-level directory's state (``""`` for the root)."""

    after: str = ""  # the watermark: every name up to it is finished or held in files
    digest: str = ""  # of the names up to the watermark, to notice one added (late)
    changed: float = 0.0  # newest change time of the files closed (or reported late) here: a name below with a newer one is late


def is_done(rel: str, f: OpenFile) -> bool:
    """Read to its end as of this poll (a .txt: taken; a compressed file: ``end``)."""
    if f.stat is None:
        return False
    if is_compressed(rel):
        return f.end or f.stat.size == 0
    return (f.offset > 0 or f.stat.size == 0) if is_txt(rel) else f.offset >= f.stat.size


def encode(files: dict[str, OpenFile], dirs: dict[str, Watermark]) -> dict[str, Any]:
    out = {}
    for rel, f in sorted(files.items()):
        entry: dict[str, Any] = {"offset": f.offset}
        if f.id is not None:
            entry["id"] = f.id
        if f.fpn:
            entry.update(fp=f.fp, fpn=f.fpn)
        if f.size is not None:
            entry["size"] = f.size
        if f.end:
            entry["end"] = True
        out[rel] = entry
    marks = {d: dataclasses.asdict(s) for d, s in sorted(dirs.items())}
    return {"format": FORMAT, "dirs": marks, "files": out}


def decode(position: dict[str, Any], now: float) -> tuple[dict[str, OpenFile], dict[str, Watermark]]:
    """The open files (first seen and changed ``now``) and the watermarks of ``position``."""
    try:
        if "format" not in position and "offsets" in position:  # before format 2: identity learned at first sight
            files = {str(k): {"offset": int(v)} for k, v in position["offsets"].items()}
            dirs: dict[str, Any] = {}
        else:
            files, dirs = position.get("files", {}), position.get("dirs", {})
        open_files = {str(rel): OpenFile(int(e["offset"]), e.get("id"), str(e.get("fp", "")), int(e.get("fpn", 0)), now, now,
                                         size=None if e.get("size") is None else int(e["size"]), end=e.get("end") is True)
                      for rel, e in files.items()}
        marks = {str(d): Watermark(str(s.get("after", "")), str(s.get("digest", "")), float(s.get("changed", 0.0)))
                 for d, s in dirs.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"source position is not one this source wrote ({type(e).__name__}: {e})") from e
    return open_files, marks
