"""``S3Store``: lists and reads a DirectorySource's objects on S3 (``s3://``) through s3fs's client.

Listing is ``list_objects_v2`` per top-level prefix with ``StartAfter`` its watermark, so
finished objects are not even listed; s3fs's listing cache is never used, so objects
uploaded by another client are seen at the next poll. Identity is the ETag (a content
hash). Reads are ranged GETs with ``If-Match`` on the listed ETag: a replaced object is
reported as ``Changed``, never mixed into the one being read.
"""

import errno
from collections.abc import Iterable
from typing import Any

from fsspec.asyn import sync

from everlearn.daemon.listing import Changed, Listing, Stat, is_stream_name, seconds, top


class S3Store:
    id_is_content = True

    def __init__(self, fs, root: str):
        self.fs = fs
        self.bucket, key, _ = fs.split_path(root)
        self.base = key.strip("/") + "/" if key.strip("/") else ""

    def _pages(self, **kw) -> Iterable[dict]:
        token = None
        while True:
            page = self.fs.call_s3("list_objects_v2", Bucket=self.bucket, **kw, **({"ContinuationToken": token} if token else {}))
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _from(self, rel: str, size: int, etag: str, modified: Any) -> Stat:
        etag = etag.strip('"')
        return Stat(rel, size, (size, str(modified), etag), seconds(modified), etag)

    def list(self, after: dict[str, str], tracked: set[str]) -> Listing:
        stats, dirs = {}, set(after) - {""}
        start = {"StartAfter": self.base + after[""]} if after.get("") else {}
        try:
            pages = list(self._pages(Prefix=self.base, Delimiter="/", **start))
        except FileNotFoundError:  # no such bucket: an empty stream, like a missing directory
            return Listing({}, None, set())
        for page in pages:
            for p in page.get("CommonPrefixes", []):
                dirs.add(p["Prefix"][len(self.base) :].rstrip("/"))
            for o in page.get("Contents", []):
                rel = o["Key"][len(self.base) :]
                if is_stream_name(rel):
                    stats[rel] = self._from(rel, o["Size"], o.get("ETag", ""), o.get("LastModified"))
        for d in sorted(dirs):
            start = {"StartAfter": self.base + after[d]} if after.get(d) else {}
            for page in self._pages(Prefix=f"{self.base}{d}/", **start):
                for o in page.get("Contents", []):
                    rel = o["Key"][len(self.base) :]
                    if is_stream_name(rel):
                        stats[rel] = self._from(rel, o["Size"], o.get("ETag", ""), o.get("LastModified"))
        # files still open whose names the watermark has passed: one HEAD each (they are few: changed lately)
        stats.update(self.stat(rel for rel in tracked if rel not in stats and rel <= after.get(top(rel), "")))
        return Listing(stats, None, dirs)

    def stat(self, rels: Iterable[str]) -> dict[str, Stat]:
        out = {}
        for rel in rels:
            try:
                h = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.base + rel)
            except FileNotFoundError:
                continue
            out[rel] = self._from(rel, h["ContentLength"], h.get("ETag", ""), h.get("LastModified"))
        return out

    def open(self, s: Stat) -> "_S3Range":
        return _S3Range(self, s)


class _S3Range:
    """Ranged GETs of one object version: ``If-Match`` its ETag, so a replaced object is never mixed in."""

    def __init__(self, store: S3Store, s: Stat):
        self.store, self.s, self.pos = store, s, 0
        self.head = b""

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        end = min(self.pos + n, self.s.size)
        if end <= self.pos:
            return b""
        fs = self.store.fs
        cond = {"IfMatch": f'"{self.s.id}"'} if self.s.id else {}
        try:
            data = sync(fs.loop, _get_range, fs, self.store.bucket, self.store.base + self.s.rel, self.pos, end, cond)
        except FileNotFoundError as e:
            raise Changed(self.s.rel) from e
        except OSError as e:
            if _precondition_failed(e):
                raise Changed(self.s.rel) from e
            raise
        if self.pos == 0:
            self.head = data
        self.pos += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


async def _get_range(fs, bucket: str, key: str, start: int, end: int, cond: dict) -> bytes:
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **cond)
    try:
        return await resp["Body"].read()
    finally:
        resp["Body"].close()


def _precondition_failed(e: BaseException) -> bool:
    cause = e.__cause__
    response = getattr(cause, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412") or status == 412 or (e.errno == errno.EINVAL and "re-condition" in str(e))
