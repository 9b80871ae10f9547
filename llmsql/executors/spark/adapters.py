"""LoRA adapter files for Spark executors, which may not see the driver's folders.

A call with ``adapter => 'name'`` runs with the session's
:class:`~llmsql.backends.base.AdapterRef` for that name (``StepEnv.adapters``), whose path is a
folder on the driver. Executors on other hosts cannot read it, so:

1. **Driver.** When a call's task is built, :func:`ship_adapters` reads the PEFT files of its
   adapter (``adapter_config.json`` and the weights: about 2 MB for rank 16 on SmolLM2's q/v
   projections) into the task. The task is pickled into the Spark job; PySpark broadcasts a
   job's function once it is larger than 1 MB, so each executor fetches the bytes once per
   job, not once per task. No ``SparkContext`` is needed, so this works under Spark Connect
   too.
2. **Executor.** :func:`local_refs` writes each adapter once per host into the worker's
   private folder, ``<private dir>/adapters/<digest>-<content hash>/`` (written in a
   temporary folder renamed into place, so a concurrent task or a crash never leaves a half
   copy in use), and gives the step the adapter with that local path: the requests carry it
   to the inference worker, whose engine loads the adapter from there. Cache keys use the
   digest, never the path, so driver and executors share result-cache entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmsql.backends.worker import private_dir
from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from llmsql.backends.base import AdapterRef

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
"""The PEFT files shipped (the config and whichever weights file the folder has)."""
MAX_SHIPPED_BYTES = 256 << 20
"""The largest adapter shipped inside Spark tasks."""


@dataclass(frozen=True, slots=True)
class ShippedAdapter:
    """One adapter's PEFT files, carried in a Spark task."""

    ref: AdapterRef
    files: tuple[tuple[str, bytes], ...]
    """(file name, content) pairs, in name order."""

    def content_hash(self) -> str:
        """A SHA-256 over the file names and contents (names the executor's copy)."""
        h = hashlib.sha256()
        for name, data in self.files:
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()


# ---- driver ---------------------------------------------------------------------------------


def ship_adapters(refs: Iterable[AdapterRef | None], /) -> tuple[ShippedAdapter, ...]:
    """Read the PEFT files of every adapter in ``refs`` (on the driver; None entries, the
    base model, are skipped).

    Raises:
        ConfigError: a folder cannot be read, has no ``adapter_config.json`` or weights, or
            is larger than :data:`MAX_SHIPPED_BYTES`.
    """
    return tuple(_ship(ref) for ref in refs if ref is not None)


def _ship(ref: AdapterRef) -> ShippedAdapter:
    folder = pathlib.Path(ref.path)
    names = [n for n in ADAPTER_FILES if (folder / n).is_file()]
    if "adapter_config.json" not in names or len(names) < 2:
        msg = (f"adapter {ref.name!r}: its folder {folder} has no adapter_config.json and "
               "adapter_model.safetensors, so it cannot be sent to the Spark executors; "
               "re-create the adapter (CREATE ADAPTER) or restore its files")
        raise ConfigError(msg)
    size = sum((folder / n).stat().st_size for n in names)
    if size > MAX_SHIPPED_BYTES:
        msg = (f"adapter {ref.name!r} is {size >> 20} MiB, more than the "
               f"{MAX_SHIPPED_BYTES >> 20} MiB llmsql ships inside Spark tasks; train a "
               "smaller adapter (lower rank, fewer target modules) or run the query on DuckDB")
        raise ConfigError(msg)
    try:
        files = tuple((n, (folder / n).read_bytes()) for n in sorted(names))
    except OSError as exc:
        msg = f"adapter {ref.name!r}: cannot read its files in {folder} ({exc})"
        raise ConfigError(msg) from exc
    return ShippedAdapter(ref, files)


# ---- executor -------------------------------------------------------------------------------


def adapter_root() -> pathlib.Path:
    """This host's folder of adapter copies (inside the worker's private folder)."""
    root = private_dir() / "adapters"
    root.mkdir(mode=0o700, exist_ok=True)
    return root


def local_copies(shipped: Sequence[ShippedAdapter], /,
                 root: pathlib.Path | None = None) -> dict[str, str]:
    """Write each shipped adapter under ``root`` (default :func:`adapter_root`) unless this
    host already has it; return its local folder by digest.
    """
    if not shipped:
        return {}
    base = root if root is not None else adapter_root()
    return {s.ref.digest: str(_copy(s, base)) for s in shipped}


def _copy(shipped: ShippedAdapter, base: pathlib.Path) -> pathlib.Path:
    safe = "".join(c for c in shipped.ref.digest if c.isalnum())[:32] or "adapter"
    final = base / f"{safe}-{shipped.content_hash()[:16]}"
    if final.is_dir():
        return final
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".part-", dir=base))
    try:
        for name, data in shipped.files:
            (tmp / name).write_bytes(data)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # not a lost race with another task: a real failure
            raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    return final


def local_refs(shipped: Sequence[ShippedAdapter], /,
               root: pathlib.Path | None = None) -> dict[str, AdapterRef]:
    """The shipped adapters by name, each pointing at this host's copy (see
    :func:`local_copies`).
    """
    paths = local_copies(shipped, root)
    return {s.ref.name: dataclasses.replace(s.ref, path=paths[s.ref.digest]) for s in shipped}


__all__ = ["ADAPTER_FILES", "MAX_SHIPPED_BYTES", "ShippedAdapter", "adapter_root",
           "local_copies", "local_refs", "ship_adapters"]
