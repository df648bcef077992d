"""Paths are URLs: every file or folder a user names may be a local path or `gs://bucket/key` (Google Cloud Storage).

One module for it, over etils.epath (for gs://: fsspec -> gcsfs; never TensorFlow). The rest of the package calls
these functions with plain strings and never `os.*`, `shutil` or `open` on a path a user gave (on "gs://..." those
would act on a local folder named `gs:`).

What a bucket is not, and what follows here:
- No directories: `makedirs` is a no-op, a "folder" exists while an object lies below it.
- No append: gcsfs turns mode "a" into an overwrite. Small files that grow (metrics.jsonl) are rewritten whole.
- No atomic rename of folders (a rename is a copy + delete per object). Single objects are atomic: an upload appears
  complete under its name or not at all. So files are published by writing their final name directly
  (`write_bytes`, `local_output`), and a folder by uploading its files with a commit marker last
  (`ipadapter_jax.staging.upload(last=)`): readers look for the marker (dataset_info.json, cache_info.json,
  commit_success.txt of orbax).
- Create-if-absent and compare-and-swap of one object (`write_if_generation`): what a lock needs (`locks`).
- array_record reads and writes POSIX files only: `ipadapter_jax.staging` copies bucket folders to local disk.

`check_storage` is what every command calls first, so a bad bucket name, a missing bucket or missing credentials is
one `error:` line before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

SCHEMES = ("gs",)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


class BadURL(ValueError):
    """A URL this package cannot use (unknown scheme, invalid bucket name, no such bucket): a usage error."""


class NoCredentials(PermissionError):
    """No Google Cloud credentials were found, or they give no access to the bucket."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (`gs://...`) rather than a local path."""
    return _URL.match(os.fspath(path)) is not None


def as_epath(path: str | os.PathLike) -> Any:
    """The `etils.epath.Path` of `path` (local or remote)."""
    from etils import epath

    return epath.Path(os.fspath(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...`, keeping a URL's `scheme://`."""
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts if part)])


def parent(path: str | os.PathLike) -> str:
    """The folder holding `path` (absolute for a local path; a URL keeps its scheme)."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.dirname(os.path.abspath(path))
    return path.rstrip("/").rsplit("/", 1)[0]


def split_url(url: str | os.PathLike) -> tuple[str, str, str]:
    """(scheme, bucket, key) of a URL."""
    match = _URL.match(os.fspath(url))
    if match is None:
        raise BadURL(f"{url}: not a URL")
    bucket, _, key = match.group(2).partition("/")
    return match.group(1), bucket, key.strip("/")


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or folder is at `path` (for a bucket: asked afresh, not from gcsfs's listing cache)."""
    if not is_remote(path):
        return os.path.exists(path)
    fs, key = _fresh(path)
    return fs.exists(key)


def is_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder (in a bucket: objects lie below it)."""
    if not is_remote(path):
        return os.path.isdir(path)
    fs, key = _fresh(path)
    return fs.isdir(key)


def is_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file (in a bucket: an object)."""
    if not is_remote(path):
        return os.path.isfile(path)
    fs, key = _fresh(path)
    return fs.isfile(key)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names in the folder (sorted); FileNotFoundError when there is none."""
    if not is_remote(path):
        return sorted(os.listdir(path))
    fs, key = _fresh(path)
    names = sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(key, detail=False) if name.rstrip("/") != key)
    if not names:
        raise FileNotFoundError(f"{path}: no such folder")
    return names


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local folder and its parents; nothing for a bucket (it has no folders)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def size(path: str | os.PathLike) -> int:
    """The file's size in bytes."""
    if not is_remote(path):
        return os.path.getsize(path)
    fs, key = _fresh(path)
    return fs.size(key)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file (FileNotFoundError if absent)."""
    return as_epath(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    """The whole file as UTF-8 text."""
    return read_bytes(path).decode()


def read_json(path: str | os.PathLike) -> Any:
    """The file parsed as JSON."""
    return json.loads(read_bytes(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `path` atomically: readers see the old content or the whole new one (local: temporary file +
    rename; bucket: one object upload)."""
    if is_remote(path):
        as_epath(path).write_bytes(data)
        return
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text (atomic)."""
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    """`write_bytes` of `data` as JSON (atomic)."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


def remove(path: str | os.PathLike) -> None:
    """Deletes a file (nothing if absent)."""
    with contextlib.suppress(FileNotFoundError):
        as_epath(path).unlink() if is_remote(path) else os.unlink(path)


def rmtree(path: str | os.PathLike) -> None:
    """Deletes a folder and everything below it (nothing if absent)."""
    if is_remote(path):
        fs, root = filesystem(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(root, recursive=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves a file or folder (in a bucket: copy + delete per object, not atomic)."""
    if is_remote(source) != is_remote(target):
        raise ValueError(f"cannot move {source} to {target}: between a bucket and a local disk")
    if is_remote(source):
        fs, root = filesystem(source)
        fs.mv(root, filesystem(target)[1], recursive=True)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        shutil.move(os.fspath(source), os.fspath(target))


def generation(path: str | os.PathLike) -> str | None:
    """The object's generation (a version number that changes on every write); None if absent."""
    fs, key = filesystem(path)
    try:
        return str(fs.info(key, refresh=True)["generation"])
    except FileNotFoundError:
        return None


def write_if_generation(path: str | os.PathLike, data: bytes, expected: str) -> None:
    """Writes the object only if its generation is `expected` ("0": only if absent): GCS's compare-and-swap.

    Raises:
      FileExistsError: the object changed (or exists, for "0") meanwhile; nothing was written.
    """
    fs, key = filesystem(path)
    bucket, _, name = key.partition("/")
    head = f"--==0==\nContent-Type: application/json\n\n{json.dumps({'name': name})}\n--==0==\n"
    body = (head + "Content-Type: application/octet-stream\n\n").encode() + data + b"\n--==0==--"
    fs.call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o", uploadType="multipart",
            ifGenerationMatch=expected, data=body, headers={"Content-Type": 'multipart/related; boundary="==0=="'},
            json_out=True)  # fmt: skip
    fs.invalidate_cache(key)


@contextlib.contextmanager
def local_output(path: str | os.PathLike) -> Iterator[str]:
    """Yields a local temporary file path; on normal exit it is published as `path` (local: a rename in the same
    folder; bucket: one upload, so the object appears complete or not at all). On an exception nothing is
    published and the temporary file is deleted."""
    path = os.fspath(path)
    folder = None if is_remote(path) else os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        if folder is None:
            fs, key = filesystem(path)
            fs.put_file(tmp, key)
            check_size(path, os.path.getsize(tmp), fs.size(key))
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_storage(urls: Sequence[str | os.PathLike | None]) -> None:
    """Checks every URL among `urls` (local paths and empty values are skipped) before any work: a known scheme,
    a valid bucket name, credentials, and a bucket that exists.

    Raises:
      BadURL: an unknown scheme, an invalid bucket name, or a bucket that does not exist.
      NoCredentials: no credentials were found, or they give no access to the bucket.
    """
    checked: set[str] = set()
    for url in urls:
        if not url or not is_remote(url):
            continue
        scheme, bucket, _ = split_url(url)
        if scheme not in SCHEMES:
            raise BadURL(f"{url}: unsupported scheme {scheme}://; paths are local or gs://BUCKET/...")
        if not _BUCKET.match(bucket) or ".." in bucket or (len(bucket) > 63 and "." not in bucket):
            raise BadURL(
                f"{url}: invalid bucket name {bucket!r}; bucket names have 3-63 lowercase letters, digits, '-', '_' "
                "or '.', and start and end with a letter or digit"
            )
        if bucket in checked:
            continue
        checked.add(bucket)
        fs, _ = filesystem(url)
        if getattr(fs.credentials, "method", None) == "anon" and not _anonymous_requested():
            raise NoCredentials(
                f"{url}: no Google Cloud credentials found (Application Default Credentials, gcloud, or the VM's "
                "service account); run `gcloud auth application-default login`, or set FSSPEC_GS_TOKEN=anon for a "
                "public bucket"
            )
        try:
            fs.call("GET", "b/{}/o", bucket, maxResults=1, json_out=True)  # needs only storage.objects.list
        except FileNotFoundError:
            raise BadURL(f"{url}: the bucket {bucket!r} does not exist; create it (`gcloud storage buckets create "
                         f"gs://{bucket}`) or fix the name") from None  # fmt: skip
        except OSError as err:
            if "Forbidden" in str(err) or "401" in str(err):
                raise NoCredentials(f"{url}: the credentials give no access to the bucket {bucket!r} "
                                    f"({' '.join(str(err).split())[:200]})") from None  # fmt: skip
            raise


def _anonymous_requested() -> bool:
    import fsspec.config

    return os.environ.get("FSSPEC_GS_TOKEN") == "anon" or any(
        fsspec.config.conf.get(protocol, {}).get("token") == "anon" for protocol in ("gs", "gcs")
    )


def filesystem(url: str | os.PathLike) -> tuple[Any, str]:
    """(the fsspec filesystem, the path without scheme) of a URL."""
    import fsspec

    return fsspec.core.url_to_fs(os.fspath(url))


def _fresh(url: str | os.PathLike) -> tuple[Any, str]:
    """`filesystem(url)`, with gcsfs's cached listings of the key and its folder dropped: another process (the
    other hosts of a pod) may have written there since."""
    fs, key = filesystem(url)
    fs.invalidate_cache(key)
    fs.invalidate_cache(key.rstrip("/").rsplit("/", 1)[0])
    return fs, key


def listing(fs: Any, root: str) -> dict[str, dict]:
    """relative path -> object info of every object at or below `root` ("" for `root` itself), listed afresh (gcsfs
    caches listings: another process, or this one's last upload, may have changed them)."""
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True, withdirs=False)
    except FileNotFoundError:
        return {}
    prefix = root.rstrip("/") + "/"
    return {("" if name == root else name[len(prefix) :]): info for name, info in found.items()
            if name == root or name.startswith(prefix)}  # fmt: skip


def check_size(what: str, expected: int, found: int | None) -> None:
    if found != expected:
        raise OSError(f"{what}: copied {found} bytes, expected {expected}; likely cause: an interrupted transfer")
