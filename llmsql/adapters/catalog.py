"""The adapter catalog: one JSON record per adapter in a folder, written atomically.

A record (:class:`AdapterRecord`) says what an adapter is for (the call: function,
instruction, prompt fields, call options), which base model it adapts, how it is trained
(:class:`~llmsql.adapters.options.LoraOptions`), where its rows come from, and how training
went (status, loss curve, held-out metrics). Its weights live in the folder ``path`` names
(by default ``<catalog>/<name>/``, written by the engine).

Every write goes to a temporary file in the catalog folder that is flushed and fsynced,
then renamed over the record (``os.replace``; a new record is linked in with ``os.link``,
which refuses to overwrite), and the folder is fsynced. A crash or a full disk therefore
leaves either the old record or the new one, never a half-written one; a failed write
raises :class:`~llmsql.errors.ExecutionError` and removes its temporary file.

>>> import tempfile
>>> from llmsql.adapters.statements import parse_adapter_statement
>>> cat = AdapterCatalog(tempfile.mkdtemp())
>>> stmt = parse_adapter_statement(
...     "CREATE ADAPTER fresh FOR LLM_FILTER('Fresh?', review) AS SELECT review, label FROM t")
>>> cat.create(cat.new_record(stmt, base_model="transformers:smollm2")).status
'training'
>>> cat.update("fresh", status="ready", loss_curve=((1, 0.7), (2, 0.4))).loss_curve
((1, 0.7), (2, 0.4))
>>> [r.name for r in cat.list()], cat.drop("fresh"), cat.list()
(['fresh'], True, ())
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmsql.adapters.options import LoraOptions, lora_options_from_json
from llmsql.adapters.statements import NAME
from llmsql.errors import ConfigError, ExecutionError, PlanError
from llmsql.files import fsync_path
from llmsql.udfs.base import CallOptions, SchemaField

if TYPE_CHECKING:
    from collections.abc import Mapping

    from llmsql.adapters.statements import CreateAdapter

STATUSES = ("training", "ready", "failed", "incomplete")
"""``training`` (running now), ``ready``, ``failed`` (``reason`` says why), ``incomplete``
(training stopped before finishing: a crash or Ctrl-C; re-running resumes)."""
FORMAT = 1
"""The record format version, written in every record."""
SHOW_COLUMNS = ("name", "status", "progress", "function", "instruction", "base_model", "rank",
                "steps", "loss", "metrics", "reason", "path", "created")
"""The columns of ``SHOW ADAPTERS`` (:meth:`AdapterRecord.show_row`)."""
_SUFFIX = ".json"
_DEFINITION = ("base_model", "kind", "instruction", "columns", "call_options", "lora",
               "source", "label")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """One adapter of the catalog."""

    name: str
    base_model: str
    """The identity of the model it adapts (e.g. :func:`llmsql.cache.model_key`)."""
    kind: str
    """The LLM function's SQL name (``LLM_FILTER``...)."""
    instruction: str
    columns: tuple[str, ...]
    """The prompt fields, in rendering order."""
    call_options: CallOptions
    lora: LoraOptions
    source: str
    """The ``AS SELECT ...`` giving the training rows."""
    label: str
    """The label column of ``source``."""
    path: str
    """The folder of its weights."""
    created: str
    """ISO 8601 time (UTC) of the CREATE."""
    status: str = "training"
    reason: str = ""
    """Why it failed or is incomplete (empty otherwise)."""
    loss_curve: tuple[tuple[int, float], ...] = ()
    """(step, training loss) pairs."""
    metrics: tuple[tuple[str, float], ...] = ()
    """Held-out metrics, e.g. (("accuracy_before", 0.61), ("accuracy_after", 0.83))."""
    updated: str = ""
    progress: str = ""
    """Where training is, e.g. ``120/250 steps`` (updated while it runs)."""
    digest: str = ""
    """A digest of the finished weights (part of every result-cache key of a call using
    it); empty until the adapter is ready."""

    @classmethod
    def new(cls, stmt: CreateAdapter, *, base_model: str, path: str | os.PathLike[str],
            ) -> AdapterRecord:
        """The record of a fresh ``CREATE ADAPTER`` (status ``training``)."""
        if not base_model:
            msg = "an adapter needs its base model's identity; pass base_model='...'"
            raise ConfigError(msg)
        now = _now()
        return cls(stmt.name, base_model, stmt.call.kind, stmt.call.instruction,
                   stmt.call.columns, stmt.call.options, stmt.lora, stmt.source, stmt.label,
                   str(path), now, updated=now)

    def show_row(self) -> dict[str, object]:
        """The adapter as a ``SHOW ADAPTERS`` row (:data:`SHOW_COLUMNS`)."""
        last = self.loss_curve[-1] if self.loss_curve else (None, None)
        return {"name": self.name, "status": self.status, "progress": self.progress,
                "function": self.kind,
                "instruction": self.instruction, "base_model": self.base_model,
                "rank": self.lora.rank, "steps": last[0], "loss": last[1],
                "metrics": json.dumps(dict(self.metrics)), "reason": self.reason,
                "path": self.path, "created": self.created}

    def same_definition(self, other: AdapterRecord, /) -> bool:
        """True when both describe the same training (base model, call, options, rows)."""
        return all(getattr(self, f) == getattr(other, f) for f in _DEFINITION)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values (see :meth:`from_json`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["columns"] = list(self.columns)
        out["call_options"] = _call_options_json(self.call_options)
        out["lora"] = self.lora.to_json()
        out["loss_curve"] = [list(p) for p in self.loss_curve]
        out["metrics"] = dict(self.metrics)
        return {"format": FORMAT, **out}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], /) -> AdapterRecord:
        """Read :meth:`to_json` back.

        Raises:
            ValueError, KeyError, TypeError: ``data`` is not such a record.
        """
        if data.get("format") != FORMAT:
            msg = f"unknown record format {data.get('format')!r} (this llmsql reads {FORMAT})"
            raise ValueError(msg)
        rec = cls(**{k: v for k, v in data.items() if k != "format"})
        return dataclasses.replace(
            rec, columns=tuple(rec.columns), call_options=_call_options(data["call_options"]),
            lora=lora_options_from_json(data["lora"]),
            loss_curve=tuple((int(s), float(v)) for s, v in data["loss_curve"]),
            metrics=tuple((str(k), float(v)) for k, v in data["metrics"].items()))


def _call_options_json(o: CallOptions) -> dict[str, Any]:
    return {"model": o.model, "max_tokens": o.max_tokens, "temperature": o.temperature,
            "seed": o.seed, "labels": None if o.labels is None else list(o.labels),
            "schema": None if o.schema is None else [[f.name, f.type] for f in o.schema],
            "truncate": o.truncate}


def _call_options(d: Mapping[str, Any]) -> CallOptions:
    labels = None if d["labels"] is None else tuple(str(x) for x in d["labels"])
    schema = None if d["schema"] is None else tuple(SchemaField(n, t) for n, t in d["schema"])
    return CallOptions(model=d["model"], max_tokens=d["max_tokens"],
                       temperature=float(d["temperature"]), seed=d["seed"], labels=labels,
                       schema=schema, truncate=bool(d["truncate"]))


def check_base_model(record: AdapterRecord, model: str | None, /) -> None:
    """Check that ``record`` adapts the model a query uses (identity ``model``).

    Raises:
        PlanError: the identities differ, or the query's model identity is unknown.
    """
    if model == record.base_model:
        return
    msg = (f"adapter {record.name!r} was trained for base model {record.base_model!r}, but "
           f"the query uses {model or 'a model whose identity is unknown'!r}; run it with "
           f"the model the adapter was trained for, or create an adapter for this model "
           f"(CREATE ADAPTER other_name FOR ...)")
    raise PlanError(msg)


def default_folder(database: str | None = None, /) -> Path:
    """Where a session's adapters live: next to a database file (``<file>.adapters``), else
    ``$XDG_DATA_HOME/llmsql/adapters`` (``~/.local/share`` when unset).
    """
    if database and database != ":memory:":
        db = Path(database).expanduser()
        return db.with_name(db.name + ".adapters")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "llmsql" / "adapters"


class AdapterCatalog:
    """The adapters of one folder: one ``<name>.json`` record each, weights in ``<name>/``.

    Args:
        folder: created when missing.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).expanduser()

    def record_path(self, name: str) -> Path:
        """The record file of ``name``."""
        return self.folder / f"{name}{_SUFFIX}"

    def weights_path(self, name: str) -> Path:
        """The default folder of ``name``'s weights."""
        return self.folder / name

    def checkpoint_path(self, name: str) -> Path:
        """The folder of ``name``'s training checkpoints (a re-run CREATE resumes from it)."""
        return self.folder / f".{name}.checkpoints"

    def new_record(self, stmt: CreateAdapter, *, base_model: str) -> AdapterRecord:
        """A fresh record for ``stmt`` with its weights in :meth:`weights_path`."""
        return AdapterRecord.new(stmt, base_model=base_model, path=self.weights_path(stmt.name))

    def create(self, record: AdapterRecord, /, *, resume: bool = True) -> AdapterRecord:
        """Add ``record``; never overwrites an existing adapter.

        With ``resume``, an ``incomplete`` adapter of the same definition is taken up again
        instead (status back to ``training``, its loss curve and weights kept): the CREATE
        that was interrupted, re-run.

        Raises:
            PlanError: an adapter of that name exists (nothing is changed).
            ExecutionError: the record could not be written (nothing is left half-written).
        """
        _check_name(record.name)
        existing = self._read_if_exists(record.name)
        if existing is not None:
            if resume and existing.status == "incomplete" and existing.same_definition(record):
                return self.update(record.name, status="training", reason="")
            raise self._exists(existing, record if resume else None)
        try:
            self._write(record, overwrite=False)
        except FileExistsError:
            raise self._exists(self.get(record.name)) from None
        return record

    def get(self, name: str, /) -> AdapterRecord:
        """The adapter ``name``.

        Raises:
            PlanError: there is none (the message lists the known ones).
            ConfigError: its record file is unreadable.
        """
        record = self._read_if_exists(name) if NAME.match(name) else None
        if record is None:
            known = self.names()
            have = (f"the adapters are {', '.join(known)}" if known else
                    "there are none yet; create one with CREATE ADAPTER name FOR ...")
            msg = f"unknown adapter {name!r} in {self.folder}; {have} (SHOW ADAPTERS lists them)"
            raise PlanError(msg)
        return record

    def names(self) -> tuple[str, ...]:
        """The adapters' names, sorted."""
        if not self.folder.is_dir():
            return ()
        return tuple(sorted(p.name[: -len(_SUFFIX)] for p in self.folder.iterdir()
                            if p.name.endswith(_SUFFIX) and not p.name.startswith(".")))

    def list(self) -> tuple[AdapterRecord, ...]:
        """Every adapter, by name."""
        return tuple(self.get(n) for n in self.names())

    def update(self, name: str, /, **changes: Any) -> AdapterRecord:
        """Replace fields of ``name``'s record (status, reason, loss_curve, metrics, path,
        progress, digest).

        Raises:
            PlanError: no adapter ``name``.
            ConfigError: a field that cannot change, or an unknown status.
            ExecutionError: the record could not be written (the previous one stays).
        """
        fixed = sorted(set(changes) - {"status", "reason", "loss_curve", "metrics", "path",
                                       "progress", "digest"})
        if fixed:
            msg = (f"cannot change {fixed[0]!r} of adapter {name!r}; drop it and create it "
                   "again to change its definition")
            raise ConfigError(msg)
        _check_status(changes.get("status", "ready"))
        if "metrics" in changes:
            metrics = dict(changes["metrics"])
            changes["metrics"] = tuple(sorted((str(k), float(v)) for k, v in metrics.items()))
        if "loss_curve" in changes:
            changes["loss_curve"] = tuple((int(s), float(v)) for s, v in changes["loss_curve"])
        record = dataclasses.replace(self.get(name), **changes, updated=_now())
        self._write(record, overwrite=True)
        return record

    def drop(self, name: str, /, *, if_exists: bool = False) -> bool:
        """Remove ``name``'s record, then its weights; False when absent with ``if_exists``.

        Raises:
            PlanError: no adapter ``name`` (without ``if_exists``).
        """
        if if_exists and (not NAME.match(name) or not self.record_path(name).exists()):
            return False
        record = self.get(name)
        self.record_path(name).unlink()
        fsync_path(self.folder)
        weights = Path(record.path)
        if weights.resolve().parent == self.folder.resolve():
            shutil.rmtree(weights, ignore_errors=True)
        shutil.rmtree(self.checkpoint_path(name), ignore_errors=True)
        return True

    def recover(self) -> tuple[str, ...]:
        """Mark adapters left ``training`` by a process that stopped as ``incomplete``; call
        it when opening a catalog that no training in this process is using. Returns their
        names.
        """
        stopped = tuple(r.name for r in self.list() if r.status == "training")
        for name in stopped:
            self.update(name, status="incomplete", reason=(
                "training stopped before it finished (crash or interrupt); run the same "
                "CREATE ADAPTER again to resume, or DROP ADAPTER it"))
        return stopped

    # ---- files ------------------------------------------------------------------------------

    def _exists(self, existing: AdapterRecord, new: AdapterRecord | None = None) -> PlanError:
        if existing.status == "incomplete" and new is not None:
            msg = (f"adapter {existing.name!r} already exists (incomplete, created "
                   f"{existing.created}) in {self.folder} with a different definition "
                   f"(base model, call, options or rows); nothing was changed: re-run its "
                   f"original CREATE ADAPTER to resume it, DROP ADAPTER {existing.name} "
                   "first, or choose another name")
            return PlanError(msg)
        msg = (f"adapter {existing.name!r} already exists ({existing.status}, created "
               f"{existing.created}) in {self.folder}; nothing was changed: DROP ADAPTER "
               f"{existing.name} first, or choose another name")
        return PlanError(msg)

    def _read_if_exists(self, name: str) -> AdapterRecord | None:
        path = self.record_path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return AdapterRecord.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            msg = (f"adapter record {path} is unreadable ({exc}); delete the file (and the "
                   f"folder {self.weights_path(name)}) to forget the adapter")
            raise ConfigError(msg) from None

    def _write(self, record: AdapterRecord, *, overwrite: bool) -> None:
        data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.record_path(record.name), data, overwrite=overwrite)
        except FileExistsError:
            raise
        except OSError as exc:
            msg = (f"could not write adapter {record.name!r}'s record in {self.folder} "
                   f"({exc}); the previous state is kept: free disk space or fix the "
                   "folder's permissions, then run the statement again")
            raise ExecutionError(msg, step="adapter catalog") from exc


def write_atomic(path: Path, data: bytes, /, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never a part.

    Raises:
        FileExistsError: ``path`` exists and not ``overwrite``.
        OSError: the write failed; ``path`` is as it was and no temporary file is left.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        fsync_path(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)



def _check_name(name: str) -> None:
    if not NAME.match(name):
        msg = (f"adapter name {name!r} is not allowed; use a letter or _ followed by up to 63 "
               "letters, digits or _")
        raise ConfigError(msg)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        msg = f"unknown adapter status {status!r}; the statuses are {', '.join(STATUSES)}"
        raise ConfigError(msg)
