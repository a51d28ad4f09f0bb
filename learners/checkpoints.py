"""Checkpoints on any fsspec URL, each under ONE manifest written last.

Layout under the store's root::

    step-000000120/model.safetensors    weights (safetensors only: never pickle)
    step-000000120/optimizer.pt         optimizer state (read with weights_only=True)
    step-000000120/...                  any other file a writer puts
    step-000000120/manifest.json        sha256 and size of every file above; written last
    LATEST                              name of the newest verified checkpoint

A checkpoint exists only when its manifest exists. ``LATEST`` moves only to a
manifest whose files were verified. Readers check sha256 and size before they
hand out a single byte. Directories without a manifest are swept, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from everlearn.errors import CheckpointCorruptError, CheckpointError

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


class CheckpointStore:
    """Write, verify, list and sweep checkpoints under ``url`` (file://, s3://, memory://, ...)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self._prefix = f"{protocol}://" if protocol != "file" else "file://"

    # -- paths -------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, name: str) -> str:
        path = self._path(name)
        return self._prefix + path if not path.startswith(self._prefix) else path

    # -- writing -----------------------------------------------------------
    def put(self, step: int, name: str, data: bytes) -> FileEntry:
        """Write one file of the checkpoint for ``step``; returns its digest for the manifest."""
        if "/" in name or name in (MANIFEST, LATEST):
            raise ValueError(f"bad checkpoint file name {name!r}")
        self.fs.makedirs(self._path(step_name(step)), exist_ok=True)
        self.fs.pipe_file(self._path(step_name(step), name), data)
        return digest(data)

    def commit(self, step: int, files: dict[str, FileEntry], meta: dict[str, Any] | None = None) -> CheckpointRef:
        """Verify the files, write the manifest (last), then point LATEST at it."""
        name = step_name(step)
        manifest_path = self._path(name, MANIFEST)
        if self.fs.exists(manifest_path):
            raise CheckpointError(f"checkpoint {self.uri(name)} is already committed; checkpoints are immutable")
        for fname, entry in files.items():
            try:
                got = digest(self.fs.cat_file(self._path(name, fname)))
            except FileNotFoundError as e:
                raise CheckpointCorruptError(f"{self.uri(name)}/{fname} was written but is missing on storage") from e
            if got != entry:
                raise CheckpointCorruptError(
                    f"{self.uri(name)}/{fname}: sha256 {got.sha256} size {got.size} on storage, "
                    f"sha256 {entry.sha256} size {entry.size} written; not committing this checkpoint"
                )
        manifest = {
            "format": FORMAT,
            "step": step,
            "created_unix": time.time(),
            "files": {k: asdict(v) for k, v in sorted(files.items())},
            "meta": meta or {},
        }
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self.fs.pipe_file(manifest_path, data)
        ref = CheckpointRef(uri=self.uri(name), name=name, step=step, manifest_sha256=digest(data).sha256)
        self.verify(ref)
        self._set_latest(name)
        return ref

    def _set_latest(self, name: str) -> None:
        tmp = self._path(f".{LATEST}.tmp")
        self.fs.pipe_file(tmp, name.encode())
        self.fs.mv(tmp, self._path(LATEST))

    # -- reading -----------------------------------------------------------
    def _manifest_bytes(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(name, MANIFEST))
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
            data = self.fs.cat_file(self._path(ref.name, name))
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
        """Committed checkpoints, oldest first."""
        refs = []
        for name in self._step_dirs():
            if self.fs.exists(self._path(name, MANIFEST)):
                with contextlib.suppress(CheckpointCorruptError):
                    refs.append(self.ref(name))
        return sorted(refs, key=lambda r: r.step)

    def _step_dirs(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        return sorted(n for n in names if n.startswith("step-"))

    def latest(self) -> CheckpointRef | None:
        """The newest checkpoint that verifies: LATEST if it does, else the newest that does."""
        candidates: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            candidates.append(self.fs.cat_file(self._path(LATEST)).decode().strip())
        candidates += [r.name for r in reversed(self.list())]
        for name in candidates:
            try:
                ref = self.ref(name)
                self.verify(ref)
                return ref
            except CheckpointError:
                continue
        return None

    def sweep(self, keep_last: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete uncommitted directories and committed ones beyond the newest ``keep_last``.

        ``protect`` names checkpoints that must stay (e.g. the served version).
        Returns the names removed.
        """
        committed = [r.name for r in self.list()]
        keep = set(committed[-keep_last:]) if keep_last > 0 else set()
        keep |= set(protect)
        removed = []
        for name in self._step_dirs():
            if name not in keep:
                self.fs.rm(self._path(name), recursive=True)
                removed.append(name)
        return removed
