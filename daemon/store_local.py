"""``LocalStore``: lists and reads a DirectorySource's files on a local disk (``file://``).

``os.scandir`` for names, ``os.stat`` only for names after their directory's watermark
and for files still open, so a poll does not stat months of finished files. Identity is
``st_dev:st_ino`` (kept across renames and appends); a file is opened only if it is still
the inode the listing saw.
"""

import os
import stat as stat_mod
from collections.abc import Iterable

from everlearn.daemon.listing import Bounded, Changed, Listing, Stat, is_stream_name, split, top


class LocalStore:
    id_is_content = False

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root

    def _names(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        stack = [(self.root, "")]
        while stack:
            path, prefix = stack.pop()
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue  # the root is missing (an empty stream), or a directory went away meanwhile
            for entry in entries:
                rel = prefix + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not prefix:
                            out.setdefault(rel, [])
                        stack.append((entry.path, rel + "/"))
                    elif is_stream_name(rel):
                        out.setdefault(top(rel), []).append(rel)
                except FileNotFoundError:
                    continue
        return out

    def _stat(self, rel: str) -> Stat | None:
        try:
            st = os.stat(os.path.join(self.root, rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return Stat(rel, st.st_size, (st.st_size, st.st_mtime_ns), max(st.st_mtime_ns, st.st_ctime_ns) / 1e9,
                    f"{st.st_dev}:{st.st_ino}")

    def list(self, after: dict[str, str], tracked: set[str]) -> Listing:
        names = self._names()
        below, wanted = split(names, after, tracked)
        stats = {rel: s for rel in wanted if (s := self._stat(rel)) is not None}
        return Listing(stats, below, set(names))

    def stat(self, rels: Iterable[str]) -> dict[str, Stat]:
        return {rel: s for rel in rels if (s := self._stat(rel)) is not None}

    def open(self, s: Stat) -> Bounded:
        f = open(os.path.join(self.root, s.rel), "rb")  # noqa: SIM115 closed by Bounded
        st = os.fstat(f.fileno())
        if f"{st.st_dev}:{st.st_ino}" != s.id:
            f.close()
            raise Changed(s.rel)
        return Bounded(f, s.size)
