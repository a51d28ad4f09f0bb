"""A DirectorySource's compressed files (``*.gz``, ``*.zst``): decompressed while read, in chunks, never whole.

``Unpacker.records`` reads a compressed ``.jsonl`` or ``.txt`` like daemon/source_reading.py
reads a plain one, through ``Decompressed``: a ``Reader`` whose offsets count decompressed
bytes. It pulls the compressed bytes from the store ``read_chunk_bytes`` at a time and
keeps only a window of decompressed bytes (``max_line_bytes + 1 + read_chunk_bytes``, what
the line reader may hold past the last record it took), so memory does not grow with
the file. One file's decoder is kept from poll to poll (a file is read on where the last
poll stopped); a seek before the window (a restart from a position) decodes from the
start again and drops the bytes up to the offset, chunk by chunk.

gzip goes through ``zlib`` (members one after another, zero padding between them, as
``gzip`` reads them), zstd through ``zstandard`` (frames one after another). A damaged
stream (a bad header, data that does not decode, a stream cut short: ended inside a
gzip member or a zstd frame) raises ``Corrupt`` at the damage; what was decoded before
it stands. A format checks what it checks: gzip a member's CRC at its end (a damaged
member may decode to wrong bytes before that), zstd frames only with a checksum.
"""

import zlib
from collections import deque
from collections.abc import Iterator

import zstandard

from everlearn.daemon.listing import FP_MAX, Stat, fingerprint, is_txt
from everlearn.daemon.records import RawRecord
from everlearn.daemon.source_position import OpenFile
from everlearn.daemon.source_reading import read_lines
from everlearn.daemon.stores import Reader
from everlearn.retry import is_transient


class Corrupt(Exception):
    """The compressed stream is damaged: nothing past ``unread`` compressed bytes before its end can be decoded."""

    unread = 0


class _Raw:
    """The compressed bytes from the current poll's store reader, a chunk at a time; keeps the first FP_MAX for the fingerprint."""

    def __init__(self, chunk: int):
        self.r: Reader | None = None
        self.chunk, self.watch, self.pos, self.head = chunk, None, 0, b""

    def read(self, n: int = -1) -> bytes:  # a chunk, whatever the decoder asks for
        data = self.r.read(self.chunk)
        if len(self.head) < FP_MAX:
            self.head += data[: FP_MAX - len(self.head)]
        if self.watch is not None:
            self.watch(data)
        self.pos += len(data)
        return data


class _Gunzip:
    """gzip members one after another; ``read(n)``: at most n bytes, b"" at the end, ``Corrupt`` at damage."""

    def __init__(self, raw: _Raw):
        self.raw, self.d, self.data = raw, None, b""

    def read(self, n: int) -> bytes:
        while True:
            if not self.data:
                self.data = self.raw.read()
                if not self.data:
                    if self.d is not None:
                        raise Corrupt("gzip stream cut short: it ends inside a member")
                    return b""
            if self.d is None:  # between members: zero padding, then the next member's header
                self.data = self.data.lstrip(b"\0")
                if not self.data:
                    continue
                self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out = self.d.decompress(self.data, n)
            except zlib.error as e:
                raise Corrupt(f"gzip: {e}") from e
            if self.d.eof:  # the member's end: what follows it (unconsumed_tail may repeat it)
                self.data, self.d = self.d.unused_data, None
            else:
                self.data = self.d.unconsumed_tail
            if out:
                return out


class _Frames:
    """Follows the zstd frames in the compressed bytes (headers and block sizes only) to tell a stream cut short inside one."""

    def __init__(self):
        self.state, self.want, self.hdr, self.skip, self.check = "magic", 4, b"", 0, 0

    @property
    def complete(self) -> bool:
        return self.state == "bad" or self.state == "magic" and not self.hdr and not self.skip  # bad: the decoder says why

    def __call__(self, data: bytes) -> None:
        i = 0
        while i < len(data) and self.state != "bad":
            if self.skip:
                k = min(self.skip, len(data) - i)
                self.skip, i = self.skip - k, i + k
                continue
            piece = data[i : i + self.want - len(self.hdr)]
            self.hdr, i = self.hdr + piece, i + len(piece)
            if len(self.hdr) == self.want:
                h, self.hdr = int.from_bytes(self.hdr, "little"), b""
                self._header(h)

    def _header(self, h: int) -> None:
        if self.state == "magic":  # a frame, or a skippable frame (its size next)
            self.state, self.want = ("fhd", 1) if h == 0xFD2FB528 else ("skippable", 4) if h >> 4 == 0x184D2A5 else ("bad", 0)
        elif self.state == "skippable":
            self.state, self.want, self.skip = "magic", 4, h
        elif self.state == "fhd":  # the frame header descriptor: what of the header follows, checksum or not
            single, self.check = h >> 5 & 1, h >> 2 & 1
            self.skip = (1 - single) + (0, 1, 2, 4)[h & 3] + (single, 2, 4, 8)[h >> 6]
            self.state, self.want = "block", 3
        else:  # a block header: last block?, type (raw, RLE, compressed, reserved), size
            kind, size = h >> 1 & 3, h >> 3
            if kind == 3:
                self.state = "bad"
                return
            self.skip = 1 if kind == 1 else size
            if h & 1:
                self.skip += 4 * self.check
                self.state, self.want = "magic", 4


class _Unzstd:
    """zstd frames one after another, through ``zstandard``'s stream reader; ``read(n)`` as ``_Gunzip.read``."""

    def __init__(self, raw: _Raw):
        self.frames = raw.watch = _Frames()
        self.r = zstandard.ZstdDecompressor().stream_reader(raw, read_size=raw.chunk, read_across_frames=True, closefd=False)

    def read(self, n: int) -> bytes:
        try:
            out = self.r.read1(n)  # returns once it has output: a failing store read loses nothing decoded
        except zstandard.ZstdError as e:
            raise Corrupt(f"zstd: {e}") from e
        if not out and not self.frames.complete:
            raise Corrupt("zstd stream cut short: it ends inside a frame")
        return out


class Decompressed:
    """A ``Reader`` over a compressed file's decompressed bytes: ``seek``/``read`` in decompressed offsets.

    ``attach`` gives it each poll's store reader. The last ``keep`` bytes handed out stay,
    so a seek back within them is free; a seek further back starts over from byte 0.
    """

    def __init__(self, rel: str, chunk: int, keep: int):
        self.gz, self.chunk, self.keep, self.r = rel.endswith(".gz"), chunk, keep, None
        self._start()

    def _start(self) -> None:
        self.raw = _Raw(self.chunk)
        if self.r is not None:
            self.attach(self.r)
        self.dec = _Gunzip(self.raw) if self.gz else _Unzstd(self.raw)
        self.chunks: deque[bytes] = deque()
        self.base = self.end = self.pos = 0  # decompressed offsets: of chunks[0], past the last chunk, of the cursor
        self.eof = False

    def attach(self, r: Reader) -> None:
        self.r = self.raw.r = r
        r.seek(self.raw.pos)

    def _more(self) -> bool:
        if self.eof:
            return False
        data = self.dec.read(self.chunk)
        if not data:
            self.eof = True
            return False
        self.chunks.append(data)
        self.end += len(data)
        while len(self.chunks) > 1 and self.base + len(self.chunks[0]) <= self.pos - self.keep:
            self.base += len(self.chunks.popleft())
        return True

    def seek(self, pos: int) -> None:
        if pos < self.base:
            self._start()
        self.pos = min(pos, self.end)
        while self.end < pos and self._more():  # decoded and dropped a chunk at a time
            self.pos = min(pos, self.end)

    def read(self, n: int) -> bytes:
        out, start = [], self.pos
        try:
            while n > 0 and (self.pos < self.end or self._more()):
                at = self.end
                for c in reversed(self.chunks):
                    at -= len(c)
                    if at <= self.pos:
                        piece = c[self.pos - at : self.pos - at + n]
                        break
                out.append(piece)
                self.pos += len(piece)
                n -= len(piece)
        except BaseException:
            self.pos = start  # nothing was handed out: a failed read leaves the cursor where it was
            raise
        return b"".join(out)


class Unpacker:
    """A DirectorySource's reading of its compressed files; the decoder of the file last read is kept for the next poll."""

    def __init__(self, read_chunk_bytes: int, max_line_bytes: int):
        self.chunk, self.cap = read_chunk_bytes, max_line_bytes
        self._key: tuple | None = None
        self._dec: Decompressed | None = None

    def drop(self) -> None:
        self._key = self._dec = None

    def records(self, r: Reader, rel: str, f: OpenFile, s: Stat, limit: int, domain: str) -> Iterator[RawRecord]:
        """Records of the settled compressed file ``rel`` from ``f.offset``, as for a plain one; ``f.end`` once at its end.

        Raises ``Corrupt`` (with ``unread``) at damage, after the records decoded before it.
        """
        if self._key != (rel, s.sig) or self._dec is None:
            self._dec, self._key = Decompressed(rel, self.chunk, self.cap + 1 + self.chunk), (rel, s.sig)
        dec = self._dec
        dec.attach(r)
        if f.size is None:
            f.size = s.size
        try:
            if is_txt(rel):  # at most max_line_bytes + 1 decompressed bytes, as for a plain .txt
                dec.seek(0)
                data = dec.read(self.cap + 1)
                f.offset, f.end = len(data), True
                if data:
                    yield RawRecord(data, "txt", {"file": rel, "offset": 0}, rel, domain)
            else:
                yield from read_lines(dec, rel, f, 0, True, limit, domain=domain, max_line_bytes=self.cap,
                                      read_chunk_bytes=self.chunk)
                f.end = dec.eof and f.offset >= dec.end
        except Corrupt as e:
            e.unread = max(0, s.size - dec.raw.pos)
            self.drop()
            raise
        except Exception as e:
            if not is_transient(e):  # a storage hiccup keeps the decoder: the next poll reads on
                self.drop()
            raise
        finally:
            head = dec.raw.head
            if len(head) > f.fpn:
                f.fp, f.fpn = fingerprint(head), len(head)
        if f.end:
            self.drop()
