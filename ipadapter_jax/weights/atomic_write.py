"""Write a file so that readers see either the old file or the complete new one, never a partial one.

The writer fills a temporary file in the destination's own directory (same filesystem, so the final rename is
atomic), which is flushed to disk and then `os.replace`d over the destination. On any failure the temporary
file is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from ipadapter_jax import paths


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; on normal exit it becomes `path`, on an exception it is deleted.

    The temporary file exists (empty) when the body starts; the body may overwrite or replace it. The result
    gets the permissions a plain `open(path, "w")` would give (from the umask), also when the writer replaced
    the file with a private one (safetensors writes 0600 files).
    """
    if paths.is_remote(path):
        with paths.local_output(path) as tmp:
            yield Path(tmp)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    with open(tmp, "xb"):
        mode = tmp.stat().st_mode
    try:
        yield tmp
        os.chmod(tmp, mode)
        # Data on disk before the rename: otherwise a crash right after it can leave an empty file under `path`.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
