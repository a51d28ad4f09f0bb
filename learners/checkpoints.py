"""Checkpoints on any fsspec URL, each under ONE manifest written last.

Layout under the store's root::

    step-000000120/model.safetensors    weights (safetensors only: never pickle)
    step-000000120/optimizer.pt         optimizer state (read with weights_only=True)
    step-000000120/...                  any other file a writer puts
    step-000000120/manifest.json        sha256 and size of every file above; created last, exclusively
    LATEST                              name of the newest committed checkpoint (a hint)
    set-aside/step-000000140.<ms>/      a damaged or never-committed checkpoint, moved out of the way

A checkpoint exists only when its manifest exists. Readers check sha256 and
size before they hand out a single byte. The newest checkpoint that verifies
is the one a run resumes from (LATEST is only where the search starts), and
every damaged or manifest-less directory is moved aside, never loaded and
never silently deleted, so its step number is free for the run to use again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from everlearn import failpoints
from everlearn.errors import CheckpointCorruptError, CheckpointError, StorageUnavailable
from everlearn.learners.retention import Retention, SetAside
from everlearn.learners.storeio import StoreIO

MANIFEST = "manifest.json"
LATEST = "LATEST"
FORMAT = 1


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class CheckpointRef:
    """A committed checkpoint: where it is and the digest of its manifest."""

    uri: str  # URL of the checkpoint directory, e.g. file:///runs/x/checkpoints/step-000000120
    name: str
    step: int
    manifest_sha256: str

    @property
    def store_url(self) -> str:
        """URL of the store (the directory that holds this checkpoint and LATEST)."""
        return self.uri.rsplit("/", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointRef:
        return cls(uri=d["uri"], name=d["name"], step=int(d["step"]), manifest_sha256=d["manifest_sha256"])


def digest(data: bytes) -> FileEntry:
    return FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def step_name(step: int) -> str:
    return f"step-{step:09d}"


class CheckpointStore(Retention):
    """Write, verify, list, recover and sweep checkpoints under ``url`` (file://, s3://, memory://, ...)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, keep_set_aside: int = 8,
                 timeout_s: float = 60.0, mb_per_s: float = 8.0):
        self.io = StoreIO(url, storage_options, timeout_s, mb_per_s)
        self.url, self.storage_options, self.timeout_s = self.io.url, self.io.storage_options, timeout_s
        self.fs, self.root, self.local = self.io.fs, self.io.root, self.io.local
        self.keep_set_aside = keep_set_aside
        self._prefix = f"{self.io.protocol}://" if self.io.protocol != "file" else "file://"

    # -- paths -------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, name: str) -> str:
        path = self._path(name)
        return self._prefix + path if not path.startswith(self._prefix) else path

    def write_root(self, name: str, data: bytes) -> None:
        """Replace a file beside the checkpoints (e.g. SERVED.json) all at once: written aside, then renamed."""
        self.io.replace(self._path(name), data)

    def read_root(self, name: str) -> bytes:
        """A file beside the checkpoints; FileNotFoundError when there is none."""
        return self.io.call(f"read {name}", "cat_file", self._path(name))

    # -- writing -----------------------------------------------------------
    def begin(self, step: int) -> SetAside:
        """Make way for the checkpoint of ``step``: a leftover uncommitted directory of it is moved aside."""
        name, out = step_name(step), SetAside()
        self.fs.invalidate_cache()
        if self.io.call("exists", "exists", self._path(name)):
            if self.io.call("exists", "exists", self._path(name, MANIFEST)):
                raise CheckpointError(f"checkpoint {self.uri(name)} is already committed; checkpoints are immutable")
            out.moved.append(self.set_aside(name, "an earlier write of this step never committed"))
        return out

    def put(self, step: int, name: str, data: bytes) -> FileEntry:
        """Write one file of the checkpoint for ``step``; returns its digest for the manifest."""
        if "/" in name or name in (MANIFEST, LATEST):
            raise ValueError(f"bad checkpoint file name {name!r}")
        self.io.call("makedirs", "makedirs", self._path(step_name(step)), exist_ok=True)
        self.io.call(f"write {name}", "pipe_file", self._path(step_name(step), name), data)
        return digest(data)

    def commit(self, step: int, files: dict[str, FileEntry], meta: dict[str, Any] | None = None) -> CheckpointRef:
        """Verify the files, create the manifest (last, exclusively), then point LATEST at it."""
        name = step_name(step)
        for fname, entry in files.items():
            try:
                got = digest(self.io.call(f"read {fname}", "cat_file", self._path(name, fname)))
            except FileNotFoundError as e:
                raise CheckpointCorruptError(f"{self.uri(name)}/{fname} was written but is missing on storage") from e
            if got != entry:
                raise CheckpointCorruptError(
                    f"{self.uri(name)}/{fname}: sha256 {got.sha256} size {got.size} on storage, "
                    f"sha256 {entry.sha256} size {entry.size} written; not committing this checkpoint"
                )
        manifest = {"format": FORMAT, "step": step, "created_unix": time.time(),
                    "files": {k: asdict(v) for k, v in sorted(files.items())}, "meta": meta or {}}
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        try:
            self.io.create(self._path(name, MANIFEST), data)
        except FileExistsError as e:
            raise CheckpointError(f"checkpoint {self.uri(name)} is already committed; checkpoints are immutable") from e
        failpoints.hit("checkpoint.manifest_written")
        ref = CheckpointRef(uri=self.uri(name), name=name, step=step, manifest_sha256=digest(data).sha256)
        self.verify(ref)
        self.io.replace(self._path(LATEST), name.encode())
        return ref

    # -- reading -----------------------------------------------------------
    def _manifest_bytes(self, name: str) -> bytes:
        try:
            return self.io.call("read manifest", "cat_file", self._path(name, MANIFEST))
        except FileNotFoundError as e:
            raise CheckpointError(f"no manifest at {self.uri(name)}: the checkpoint was never committed") from e

    def ref(self, name: str) -> CheckpointRef:
        data = self._manifest_bytes(name)
        try:
            step = int(json.loads(data)["step"])
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointCorruptError(f"manifest of {self.uri(name)} is unreadable: {e}") from e
        return CheckpointRef(uri=self.uri(name), name=name, step=step, manifest_sha256=digest(data).sha256)

    def manifest(self, ref: CheckpointRef) -> dict[str, Any]:
        data = self._manifest_bytes(ref.name)
        if digest(data).sha256 != ref.manifest_sha256:
            raise CheckpointCorruptError(f"manifest of {ref.uri} changed since it was committed (sha256 {digest(data).sha256} != {ref.manifest_sha256})")
        return json.loads(data)

    def read(self, ref: CheckpointRef, name: str) -> bytes:
        """The bytes of one file, after checking its sha256 and size against the manifest."""
        entry = self.manifest(ref)["files"].get(name)
        if entry is None:
            raise CheckpointError(f"{ref.uri} has no file {name!r}")
        try:
            data = self.io.call(f"read {name}", "cat_file", self._path(ref.name, name))
        except FileNotFoundError as e:
            raise CheckpointCorruptError(f"{ref.uri}/{name} is listed in the manifest but missing") from e
        got = digest(data)
        if got.size != entry["size"] or got.sha256 != entry["sha256"]:
            raise CheckpointCorruptError(
                f"{ref.uri}/{name}: sha256 {got.sha256} size {got.size} != manifest {entry['sha256']} size {entry['size']}; "
                "the file was changed or damaged after it was written and will not be loaded"
            )
        return data

    def verify(self, ref: CheckpointRef) -> None:
        for name in self.manifest(ref)["files"]:
            self.read(ref, name)

    def list(self) -> list[CheckpointRef]:
        """Committed checkpoints whose manifest parses, oldest first."""
        refs = []
        for name in self._step_dirs():
            with contextlib.suppress(CheckpointError):
                refs.append(self.ref(name))
        return sorted(refs, key=lambda r: r.step)

    def _step_dirs(self) -> list[str]:
        self.fs.invalidate_cache()  # another writer (the learner actor, a crashed daemon) changed the store
        if not self.io.call("exists", "exists", self.root):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.io.call("list", "ls", self.root, detail=False)]
        return sorted(n for n in names if n.startswith("step-"))

    def latest(self) -> CheckpointRef | None:
        """The newest checkpoint that verifies, by step (without moving anything)."""
        for name in reversed(self._step_dirs()):
            try:
                ref = self.ref(name)
                self.verify(ref)
                return ref
            except StorageUnavailable:
                raise  # an outage says nothing about the checkpoint
            except CheckpointError:
                continue
        return None

    # -- recovery (retention: retention.py) --------------------------------------
    def recover(self) -> tuple[CheckpointRef | None, SetAside]:
        """The newest checkpoint that verifies; every newer or manifest-less directory is moved aside.

        Storage outages raise StorageUnavailable and move nothing: only a checkpoint
        that was read and found wrong is set aside.
        """
        out, found = SetAside(), None
        for name in reversed(self._step_dirs()):
            try:
                ref = self.ref(name)
                if found is None:
                    self.verify(ref)
                    found = ref
            except StorageUnavailable:
                raise
            except CheckpointError as e:
                out.moved.append(self.set_aside(name, str(e)))
        if found is not None:
            with contextlib.suppress(StorageUnavailable):
                self.io.replace(self._path(LATEST), found.name.encode())
        return found, out
