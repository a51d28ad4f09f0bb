"""``FsspecStore``: lists and reads a DirectorySource's files on any other fsspec filesystem.

The fallback for what has no store of its own (``memory://``, gcs, azure, ...): one
``find`` per poll with the filesystem's listing cache invalidated first, so files written
by another client are seen at the next poll. Identity is the ETag where the filesystem
reports one, otherwise unknown (the source then goes by the first bytes' fingerprint).
"""

from collections.abc import Iterable

from everlearn.daemon.listing import Bounded, Listing, Stat, is_stream_name, seconds, split, top


class FsspecStore:
    id_is_content = False

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root
        self._infos: dict[str, dict] = {}

    def _rel(self, path: str) -> str:
        path, root = path.rstrip("/").lstrip("/"), self.root.lstrip("/")
        return path[len(root) + 1 :] if path.startswith(root + "/") else path

    def _stat(self, rel: str) -> Stat | None:
        info = self._infos.get(rel)
        if info is None:
            return None
        size = int(info.get("size") or 0)
        mtime = next((info[k] for k in ("mtime", "LastModified", "updated", "created") if info.get(k) is not None), None)
        etag = info.get("ETag") or info.get("etag")
        return Stat(rel, size, (size, str(mtime), etag), seconds(mtime), etag)

    def list(self, after: dict[str, str], tracked: set[str]) -> Listing:
        self.fs.invalidate_cache(self.root)  # another writer's files must be seen: no cached listing
        cache = getattr(self.fs, "dircache", None)
        if cache:
            for key in [k for k in list(cache) if k.startswith(self.root.rstrip("/") + "/")]:
                cache.pop(key, None)
        try:
            found = self.fs.find(self.root, detail=True, withdirs=True)
        except FileNotFoundError:
            found = {}
        self._infos, names, dirs = {}, {}, set()
        for path, info in found.items():
            rel = self._rel(path)
            if not rel or rel == self.root.strip("/"):
                continue
            if info.get("type") == "directory":
                if "/" not in rel:
                    dirs.add(rel)
            elif is_stream_name(rel):
                self._infos[rel] = info
                names.setdefault(top(rel), []).append(rel)
        below, wanted = split(names, after, tracked)
        return Listing({rel: s for rel in wanted if (s := self._stat(rel)) is not None}, below, dirs | set(names))

    def stat(self, rels: Iterable[str]) -> dict[str, Stat]:
        return {rel: s for rel in rels if (s := self._stat(rel)) is not None}

    def open(self, s: Stat) -> Bounded:
        path = f"{self.root}/{s.rel}"
        try:
            f = self.fs.open(path, "rb", cache_type="none")
        except TypeError:
            f = self.fs.open(path, "rb")
        return Bounded(f, s.size)
