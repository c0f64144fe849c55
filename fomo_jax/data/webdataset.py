"""WebDataset tar shards: a writer and a random-access reader (spec/fif.md §2.7).

A WebDataset shard is a plain tar whose consecutive members `<key>.<ext>` form one sample
(key = the member path up to the first "." of its basename, directory kept). The pretraining-
replay pool ships in this format. grain wants random access, so `WebDatasetSource` scans the tar
headers once, keeps only (shard, offset, size) per member, and reads each sample with one
positioned read per field. The index can be cached in a sidecar `<shard>.idx.json` so that
reopening a 1.3M-sample pool does not rescan every header.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import operator
import os
import re
import tarfile
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # first present wins, as in the reference loader
TEXT_EXT = "txt"
INDEX_VERSION = 1
MAX_OPEN_FILES_PER_THREAD = 8  # bounds descriptors for pools with thousands of shards

# webdataset's own split: key = everything up to the first "." of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_FS = "surrogateescape"  # tarfile decodes odd member names this way; keep them round-trippable


def split_key(name: str) -> tuple[str, str] | None:
    """("dir/000123", "jpg") for "dir/000123.jpg"; None for names without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


# ----------------------------------------------------------------------------------- writing


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header with every varying field pinned, so shards are byte-reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _sample_members(sample: Mapping[str, bytes | str]) -> list[tuple[str, bytes]]:
    key = sample.get("__key__")
    if not isinstance(key, str) or split_key(f"{key}.x") != (key, "x"):
        raise ValueError(f"sample key {key!r} must be a non-empty str without '.' in its basename")
    members = []
    for ext in sorted(k for k in sample if not k.startswith("__")):
        value = sample[ext]
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"sample {key!r} field {ext!r}: expected bytes or str")
        if not ext or "/" in ext:
            raise ValueError(f"sample {key!r}: bad extension {ext!r}")
        members.append((f"{key}.{ext}", bytes(value)))
    return members


def write_shard(path: str, samples: Sequence[Mapping[str, bytes | str]]) -> None:
    """Write one shard atomically (`.tmp`, then renamed): a crash never leaves half a shard."""
    tmp = path + ".tmp"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                for name, data in _sample_members(sample):
                    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_shards(
    samples: Iterable[Mapping[str, bytes | str]],
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
) -> list[str]:
    """Write samples {"__key__": key, ext: bytes | str, ...} as `<prefix>-000000.tar`, ...

    str values are UTF-8 encoded; fields are stored in sorted extension order; headers carry
    mtime/uid/gid 0, so equal input gives equal bytes. Each shard is written to `.tmp` and
    renamed into place, so a crash never leaves a half shard under a `.tar` name. Shards from an
    earlier, longer run in `out_dir` are not deleted. Returns the shard paths.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    iterator, paths = iter(samples), []
    while chunk := list(itertools.islice(iterator, samples_per_shard)):
        path = os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar")
        write_shard(path, chunk)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------- indexing


def _stat_key(path: str) -> list[int]:
    """What a cached index is valid for. The inode catches a same-size rewrite within the
    file system's mtime granularity (write_shards replaces the file, giving a new inode)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _finish_sample(key: str, fields: dict, duplicate: str | None, index: dict) -> None:
    image_ext = next((ext for ext in IMAGE_EXTS if ext in fields), None)
    missing = [what for what, ok in (("image", image_ext), ("txt", TEXT_EXT in fields)) if not ok]
    if duplicate is not None:
        index["skipped"].append([key, f"duplicate member {duplicate!r}"])
    elif missing:
        present = ",".join(sorted(fields)) or "nothing"
        index["skipped"].append([key, f"no {' and no '.join(missing)} (has {present})"])
    else:
        index["samples"].append([key, *fields[image_ext], *fields[TEXT_EXT]])


def _check_end_of_archive(path: str, offset: int) -> None:
    """tarfile ends iteration quietly at a cut or garbled header after the first one; a complete
    tar has a zero block there instead, so anything else means a damaged (often cut) shard."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise ValueError(f"truncated or corrupt at byte {offset} (no end-of-archive block)")


def scan_shard(path: str) -> dict:
    """Read every tar header of one shard once: samples, skipped samples and a names+sizes digest.

    Returns {"samples": [[key, image_offset, image_size, text_offset, text_size], ...],
    "skipped": [[key, reason], ...], "digest": hex, ...}. Raises ValueError naming the file
    if it is not a readable, complete tar.
    """
    file_size = os.path.getsize(path)
    index = {"version": INDEX_VERSION, "stat": _stat_key(path), "samples": [], "skipped": []}
    digest = hashlib.sha256()
    key, fields, duplicate = None, {}, None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > file_size:
                    raise ValueError(f"member {member.name!r} runs past the end of the file")
                digest.update(f"{member.name}\0{member.size}\n".encode("utf-8", _FS))
                parts = split_key(member.name)
                basename = member.name.rsplit("/", 1)[-1]
                if parts is None or (basename.startswith("__") and basename.endswith("__")):
                    continue  # no extension, or webdataset metadata such as __index__
                if parts[0] != key:
                    if key is not None:
                        _finish_sample(key, fields, duplicate, index)
                    key, fields, duplicate = parts[0], {}, None
                if parts[1] in fields and duplicate is None:
                    duplicate = member.name
                fields.setdefault(parts[1], (member.offset_data, member.size))
            _check_end_of_archive(path, tar.offset)
    except (tarfile.TarError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: not a valid tar shard ({error})") from error
    if key is not None:
        _finish_sample(key, fields, duplicate, index)
    index["digest"] = digest.hexdigest()
    return index


def _load_index(path: str, use_cache: bool) -> dict:
    """The shard's index from its sidecar if that matches the file, else a fresh scan (which is
    then written back; a read-only directory just means no cache)."""
    sidecar = path + ".idx.json"
    if use_cache:
        try:
            with open(sidecar, encoding="utf-8") as f:
                cached = json.load(f)
            if cached.get("version") == INDEX_VERSION and cached.get("stat") == _stat_key(path):
                return cached
        except (OSError, ValueError):
            pass
    index = scan_shard(path)
    if use_cache:
        tmp = f"{sidecar}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(index, f, separators=(",", ":"))
            os.replace(tmp, sidecar)
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
    return index


def _resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(shards, (str, os.PathLike)):
        root = os.fspath(shards)
        if not os.path.isdir(root):
            return [root]
        paths = [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.endswith(".tar")]
        if not paths:
            raise ValueError(f"no *.tar shards in {root}")
        return paths
    paths = [os.fspath(p) for p in shards]
    if not paths:
        raise ValueError("empty shard list")
    return paths


# ----------------------------------------------------------------------------------- reading


class WebDatasetSource:
    """Random-access image-text pairs from WebDataset shards, for grain.

    `shards` is a directory (all `*.tar` in it, sorted by name) or a list of shard paths (kept
    in the given order). Item i is {"image": bytes, "text": str, "key": str, "shard": basename}.
    The image is the first present of png/jpg/jpeg/webp, the text is `txt` verbatim; samples
    missing either are listed in `.skipped` as (shard, key, reason) and counted by `manifest()`.

    Reads use `os.pread` on per-thread file handles (at most MAX_OPEN_FILES_PER_THREAD per
    thread, least recently used closed first), so concurrent reads from grain's thread pool
    never share a file position. Pickling drops the handles; they reopen lazily.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        index_cache: bool = True,
    ):
        self.paths = _resolve_shards(shards)
        self.shard_names = [os.path.basename(p) for p in self.paths]
        indexes = [_load_index(p, index_cache) for p in self.paths]
        self.samples_per_shard = [len(ix["samples"]) for ix in indexes]
        self._digests = [ix["digest"] for ix in indexes]
        self.skipped = [
            (name, key, reason)
            for name, ix in zip(self.shard_names, indexes, strict=True)
            for key, reason in ix["skipped"]
        ]
        rows = [row for ix in indexes for row in ix["samples"]]
        # Compact columns: ~40 bytes per sample plus the key, and cheap to pickle.
        self._shard = np.repeat(np.arange(len(self.paths), dtype=np.int32), self.samples_per_shard)
        self._keys = np.array([row[0].encode("utf-8", _FS) for row in rows], dtype=np.bytes_)
        self._spans = np.array([row[1:] for row in rows], dtype=np.int64).reshape(-1, 4)
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self._spans)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.paths)} shards, {len(self)} samples)"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_local"]  # open file handles do not travel to other processes
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _file(self, shard: int):
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = collections.OrderedDict()
        if shard in files:
            files.move_to_end(shard)
        else:
            files[shard] = open(self.paths[shard], "rb", buffering=0)
            if len(files) > MAX_OPEN_FILES_PER_THREAD:
                files.popitem(last=False)[1].close()
        return files[shard]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._file(shard).fileno(), size, offset)
        if len(data) != size:
            raise ValueError(f"{self.paths[shard]}: short read at {offset} (shard changed?)")
        return data

    def __getitem__(self, index: int) -> dict:
        i = operator.index(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        shard = int(self._shard[i])
        image_offset, image_size, text_offset, text_size = (int(v) for v in self._spans[i])
        key = self._keys[i].decode("utf-8", _FS)
        text = self._read(shard, text_offset, text_size)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.shard_names[shard]}: {key}.txt is not UTF-8") from error
        return {
            "image": self._read(shard, image_offset, image_size),
            "text": text,
            "key": key,
            "shard": self.shard_names[shard],
        }

    def manifest(self, full_hash: bool = False) -> dict:
        """What the run saw of the pool, for its logs: shards, counts and a content hash.

        `content_hash` is a sha256 over the shard basenames and, per shard, every member's name
        and size, taken from the index: cheap, and it changes when members are added, removed,
        renamed or resized, but not when bytes change at equal size. `full_hash=True` also
        returns `bytes_hash`, over names, sizes and member bytes, which re-reads the whole pool.
        """
        content = hashlib.sha256()
        for name, digest in zip(self.shard_names, self._digests, strict=True):
            content.update(f"{name}\0{digest}\n".encode("utf-8", _FS))
        manifest = {
            "shards": list(self.shard_names),
            "samples_per_shard": list(self.samples_per_shard),
            "total": len(self),
            "skipped": len(self.skipped),
            "content_hash": content.hexdigest(),
            "content_hash_covers": "shard names, member names and sizes",
        }
        if full_hash:
            manifest["bytes_hash"] = self._bytes_hash()
        return manifest

    def _bytes_hash(self) -> str:
        full = hashlib.sha256()
        for name, path in zip(self.shard_names, self.paths, strict=True):
            full.update(f"{name}\n".encode("utf-8", _FS))
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if member.isfile():
                        full.update(f"{member.name}\0{member.size}\n".encode("utf-8", _FS))
                        with tar.extractfile(member) as f:
                            while chunk := f.read(1 << 20):
                                full.update(chunk)
        return full.hexdigest()
