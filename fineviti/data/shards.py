"""Webdataset shards as img2dataset writes them (`key.jpg`, `key.txt`, `key.json` in one tar), with an index in
the format of DALI's `wds2idx` for random access by byte offset.

Index format (DALI "v1.2"): a first line `v1.2 <n_samples>`, then one line per sample listing each of its files as
`<ext> <data_offset> <size> <name>` (offsets in bytes from the start of the tar to the member's data, i.e. after
its 512-byte header). `write_index` reads the tar with `tarfile`, so it also indexes tars from elsewhere; a tar cut
short is indexed up to its last complete member and the loss is reported, never raised.

The writer is deterministic: members in the order they are given, mtime 0, uid/gid 0, empty user and group names,
mode 0644, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tarfile
import tempfile
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from fineviti._files import as_new_file

INDEX_VERSION = "v1.2"


def split_name(name: str) -> tuple[str, str]:
    """`dir/key.EXT.gz` -> ('dir/key', 'ext.gz'), as wds2idx splits (at the first dot of the base name); the
    extension lower-cased, as webdataset's group_by_keys does (`000.JPG` is an image)."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


@dataclasses.dataclass
class Member:
    offset: int  # byte offset of the data in the tar
    size: int
    name: str


@dataclasses.dataclass
class IndexedSample:
    key: str
    members: dict[str, Member]  # extension -> member


class ShardWriter:
    """Writes samples into `{prefix}-{n:05d}.tar` files of at most `samples_per_shard` samples, each with its
    `.idx` beside it. Use as a context manager; `shards` lists the tar paths written."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", samples_per_shard: int = 1000):
        if samples_per_shard < 1:
            raise ValueError(f"ShardWriter: samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_next(self) -> None:
        self._finish()
        path = self.out_dir / f"{self.prefix}-{len(self.shards):05d}.tar"
        self.shards.append(path)
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            write_index(self.shards[-1])
            self._tar = None

    def write(self, key: str, files: Iterable[tuple[str, bytes]]) -> None:
        """One sample: `files` are (extension, bytes) pairs, written in the given order as `key.extension`."""
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"ShardWriter.write: key must not contain a dot (webdataset splits there), got {key!r}")
        if self._tar is None or self._count >= self.samples_per_shard:
            self._open_next()
        for ext, data in files:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> None:
        self._finish()


def index_path(tar_path: str | os.PathLike) -> Path:
    """`dir/name.tar` -> `dir/name.idx` (wds2idx's default); `coyo.v1-00000.tar` -> `coyo.v1-00000.idx` (cut at
    the first dot, shards with dotted names shared one index, each overwriting the others')."""
    tar_path = Path(tar_path)
    return tar_path.with_suffix(".idx")


_END = b"\0" * 512  # a tar ends with (at least) two zero blocks; tarfile stops reading at the first


def _escape(name: str) -> str:
    """A member name as the index's space-separated fields can hold it (whitespace and % percent-encoded)."""
    if not any(c.isspace() or c == "%" for c in name):
        return name
    return "".join(urllib.parse.quote(c, safe="") if c.isspace() or c == "%" else c for c in name)  # (UTF-8)


def _unescape(name: str) -> str:
    return urllib.parse.unquote(name) if "%" in name else name


def scan_tar(tar_path: str | os.PathLike) -> tuple[list[IndexedSample], str | None]:
    """Samples of a tar (regular files grouped by consecutive key) and an error string when the tar is damaged
    (its readable prefix is still returned, minus the last sample, which may be incomplete)."""
    samples: list[IndexedSample] = []
    error = None
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = split_name(info.name)
                if not key or key.endswith("/"):
                    continue
                if not samples or samples[-1].key != key:
                    samples.append(IndexedSample(key, {}))
                samples[-1].members[ext] = Member(info.offset_data, info.size, info.name)
            end = tar.offset  # where tarfile stopped: a whole tar has its end-of-archive block there
        # tarfile stops without an error where a cut leaves no header, or half of one: every later sample was lost
        with open(tar_path, "rb") as f:
            f.seek(end)
            if f.read(512) != _END:
                error = f"truncated: no end-of-archive block at byte {end} (the tar stops or breaks there)"
    except (tarfile.TarError, EOFError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if samples:
        file_size = os.path.getsize(tar_path)
        # tarfile yields a member whose header is whole even when its data is cut: drop members past the end.
        last = samples[-1]
        if any(m.offset + m.size > file_size for m in last.members.values()):
            samples.pop()
            error = error or f"truncated: the last sample {last.key!r} ends past the file's {file_size} bytes"
        elif error is not None:
            samples.pop()  # the sample being read when the tar broke may be missing members
    return samples, error


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                scanned: tuple[list[IndexedSample], str | None] | None = None) -> tuple[Path, str | None]:
    """Writes the wds2idx-format index of `tar_path` (from `scanned`, scan_tar's result, when given); returns its
    path and the damage found (None if whole)."""
    samples, error = scanned if scanned is not None else scan_tar(tar_path)
    idx_path = Path(idx_path) if idx_path is not None else index_path(tar_path)
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{ext} {m.offset} {m.size} {_escape(m.name)}" for ext, m in sample.members.items()))
    # written whole or not at all: ranks that open unindexed shards together each write one, and a reader must
    # never see another's half-written file (it raised "index is empty"); a temporary name no other process or
    # machine can also take
    fd, tmp = tempfile.mkstemp(prefix=f".{idx_path.name}.", suffix=".tmp", dir=idx_path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        as_new_file(tmp)  # (mkstemp's 0600 would keep the index from the data set's other users)
        os.replace(tmp, idx_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return idx_path, error


def _header_size(header: bytes) -> int | None:
    try:
        return int(header[124:136].rstrip(b"\0 ").decode("ascii") or "0", 8)
    except (ValueError, UnicodeDecodeError):
        return None  # (a base-256 size, over 8 GB, or no header there)


def index_matches(tar_path: str | os.PathLike, samples: list[IndexedSample], probes: int = 8) -> bool:
    """Whether an index describes this tar (not an older version of it): for the first and last samples and up to
    `probes` between, each member's data lies inside the file and the tar header just before it (512 bytes) gives
    the member's size and, where the index has names (v1.2), its name (or the first 100 bytes of a long one); and
    after the last sample the tar ends (`_ends_after`: an index of a tar cut short, or of one since appended to,
    hid every sample after its last). A few small reads per shard, not a scan."""
    size = os.path.getsize(tar_path)
    with open(tar_path, "rb") as f:
        if not samples:
            return _ends_after(f, 0)
        picks = sorted({0, len(samples) - 1, *range(0, len(samples), max(1, len(samples) // probes))})
        for i in picks:
            for m in samples[i].members.values():
                if m.offset < 512 or m.offset + m.size > size:
                    return False
                f.seek(m.offset - 512)
                header = f.read(512)
                raw = header[:100].rstrip(b"\0")
                # the header's name: UTF-8 in ustar tars, '?' for each non-ASCII character in a PAX tar's (whose
                # real name is in the PAX record before it); a long name's last part (ustar) or first 100 bytes
                spelled = (m.name.encode("utf-8"), m.name.encode("ascii", "replace"))
                named = m.name.startswith("?.") or any(n.startswith(raw) or n.endswith(raw) for n in spelled)
                if _header_size(header) != m.size or not raw or not named:
                    return False
        last = max(m.offset + m.size for m in samples[-1].members.values())
        return _ends_after(f, -(-last // 512) * 512)


def _ends_after(f, position: int, most: int = 4096) -> bool:
    """Whether the tar open as `f` ends at `position` (a header's place): its end-of-archive block, after at most
    `most` members the scan leaves out (directories, links, files without a key)."""
    for _ in range(most):
        f.seek(position)
        header = f.read(512)
        if header == _END:
            return True
        size = _header_size(header)
        if len(header) < 512 or size is None:
            return False
        kind = header[156:157]
        name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
        key = split_name(name)[0]
        if kind in (b"0", b"\0", b"7") and key and not key.endswith("/"):
            return False  # a sample the index lacks
        position += 512 + -(-size // 512) * 512
    return False


def read_index(idx_path: str | os.PathLike) -> list[IndexedSample]:
    """Parses a wds2idx index (v1.2: ext offset size name per file; v1.1 without the names)."""
    text = Path(idx_path).read_text().splitlines()
    if not text:
        raise ValueError(f"read_index: {idx_path} is empty; expected a first line 'v1.2 <n_samples>'")
    head = text[0].split()
    if len(head) != 2 or head[0] not in ("v1.1", "v1.2"):
        raise ValueError(f"read_index: {idx_path} starts with {text[0]!r}; expected 'v1.2 <n_samples>'")
    per_file = 4 if head[0] == "v1.2" else 3
    samples = []
    for line_no, line in enumerate(text[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) % per_file:
            raise ValueError(f"read_index: {idx_path}:{line_no} has {len(fields)} fields; expected groups of "
                             f"{per_file} (ext offset size{' name' if per_file == 4 else ''})")
        members = {}
        key = None
        for i in range(0, len(fields), per_file):
            ext, offset, size = fields[i], int(fields[i + 1]), int(fields[i + 2])
            name = _unescape(fields[i + 3]) if per_file == 4 else f"?.{ext}"
            ext = ext.lower()  # (an index from elsewhere: wds2idx keeps the case)
            members[ext] = Member(offset, size, name)
            key = split_name(name)[0] if per_file == 4 else f"{line_no - 2}"
        samples.append(IndexedSample(key, members))
    if len(samples) != int(head[1]):
        raise ValueError(f"read_index: {idx_path} declares {head[1]} samples but lists {len(samples)}")
    return samples


class ShardReader:
    """Random access to the files of indexed shards: `read(shard, member)` returns the bytes. File handles stay
    open per process (re-opened after a fork, so that loader workers do not share offsets)."""

    def __init__(self, shards: list[Path]):
        self.shards = list(shards)
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()

    def read(self, shard: int, member: Member) -> bytes:
        if self._pid != os.getpid():
            self._files = {}
            self._pid = os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 (kept open for reuse)
        data = os.pread(f.fileno(), member.size, member.offset)  # (positional: no shared file offset between threads)
        if len(data) != member.size:
            raise EOFError(f"{self.shards[shard]}: {member.name} needs {member.size} bytes at offset "
                           f"{member.offset}, the file has {len(data)} there (truncated shard?)")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __del__(self):
        # The handles are held for reuse, so nothing else closes them: without this, a reader dropped while open
        # (an eval set's lazily read images) leaves its files to the garbage collector and a ResourceWarning each.
        # (In a forked child, closing its copies leaves the parent's descriptors open.)
        if getattr(self, "_files", None):
            self.close()

    def __getstate__(self):
        return {"shards": self.shards}

    def __setstate__(self, state):
        self.__init__(state["shards"])


def list_shards(path: str | os.PathLike) -> list[Path]:
    """The tar files of a dataset folder (sorted by name), or a single tar."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".tar":
            raise ValueError(f"list_shards: {path} is a file but not a .tar shard; expected a folder of .tar shards "
                             f"or one .tar file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"list_shards: {path} is neither a folder of .tar shards nor a .tar file")
    shards = sorted(p for p in path.iterdir() if p.suffix == ".tar")
    if not shards:
        raise FileNotFoundError(f"list_shards: no .tar shards in {path}")
    return shards
