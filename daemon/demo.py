"""Text found on every machine, for the demo stream and the tests.

Two domains that differ clearly: manual pages (English prose in roff, with the
markup stripped) and Python standard-library sources. Where a machine has no
manual pages, license texts under /usr/share stand in for them.
"""

import gzip
import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

CHUNK_CHARS = 2000  # one document: about 8 training sequences of 256 bytes
_ROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\\(..|\\[-&e|^]|\\s[-+]?\d")


def _chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    buf, n = [], 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        n += len(line)
        if n >= size:
            yield "".join(buf)
            buf, n = [], 0
    if buf and "".join(buf).strip():
        yield "".join(buf)


def _roff_to_text(src: str) -> str:
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", ".ig")):
            continue
        if line.startswith("."):
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0] in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".BI", ".RB", ".IP", ".TP", ".TH"):
                line = parts[1].replace('"', "")
            else:
                continue
        out.append(_ROFF_ESCAPE.sub("", line).replace("\\", ""))
    return "\n".join(out)


def man_pages() -> Iterator[tuple[str, str]]:
    """(id, text) of English manual pages, or of license texts where there are none."""
    pages = sorted(Path("/usr/share/man/man1").glob("*.gz")) + sorted(Path("/usr/share/man/man8").glob("*.gz"))
    for page in pages:
        try:
            text = _roff_to_text(gzip.decompress(page.read_bytes()).decode("utf-8", "replace"))
        except (OSError, EOFError):
            continue
        for i, chunk in enumerate(_chunks(text)):
            yield f"man/{page.name}#{i}", chunk
    for lic in sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright")):
        if lic.is_file():
            for i, chunk in enumerate(_chunks(lic.read_text("utf-8", "replace"))):
                yield f"license/{lic.parent.name}/{lic.name}#{i}", chunk


def python_sources() -> Iterator[tuple[str, str]]:
    """(id, text) of the standard library's modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        for i, chunk in enumerate(_chunks(path.read_text("utf-8", "replace"))):
            yield f"python/{path.name}#{i}", chunk


DOMAINS = {"manpages": man_pages, "python": python_sources}


def take(docs: Iterator[tuple[str, str]], max_bytes: int, skip_bytes: int = 0) -> list[tuple[str, str]]:
    """Documents from ``docs`` worth ``max_bytes`` of text, after skipping ``skip_bytes``."""
    out, seen = [], 0
    for doc_id, text in docs:
        size = len(text.encode())
        seen += size
        if seen <= skip_bytes:
            continue
        out.append((doc_id, text))
        if seen - skip_bytes >= max_bytes:
            break
    return out


def write_jsonl(path: Path, domain: str, docs: list[tuple[str, str]]) -> int:
    """Write documents atomically (temp file, then rename); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text, "domain": domain}) + "\n")
    tmp.rename(path)
    return len(docs)


def seed_demo_stream(directory: Path, bytes_per_domain: int) -> list[Path]:
    """Fill ``directory`` with one file per domain, in the order they should be learned."""
    files = []
    for i, (domain, docs) in enumerate(DOMAINS.items()):
        path = directory / f"{i:02d}-{domain}.jsonl"
        write_jsonl(path, domain, take(docs(), bytes_per_domain))
        files.append(path)
    return files


def seed_if_empty(url: str, cfg, event) -> None:
    """With ``demo.seed_if_empty``, fill a local stream directory that holds no stream files yet (``make run``)."""
    if not cfg.seed_if_empty or "://" in url and not url.startswith("file://"):
        return
    directory = Path(url.removeprefix("file://"))
    if directory.exists() and any(p.suffix in (".jsonl", ".txt") for p in directory.rglob("*")):
        return
    files = seed_demo_stream(directory, cfg.bytes_per_domain)
    event("demo", seeded=str(directory), files=[f.name for f in files])
