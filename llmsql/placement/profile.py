"""Worker profiles: measured costs of one worker kind running one model on one machine.

Typed, frozen values (:class:`RowCost`, :class:`LayerProfile`, :class:`Link`,
:class:`WorkerProfile`), their JSON form (``"format": 1``) and :class:`ProfileStore`, one JSON
file per (kind, model, machine), written atomically (temp file + ``os.replace``).

>>> cost = fit_row_cost([(100, 10, 0.7), (200, 10, 0.8), (100, 20, 1.2), (300, 30, 1.9)])
>>> round(cost.seconds(150, 15), 6)
1.0
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

FORMAT_VERSION = 1


@dataclass(frozen=True)
class RowCost:
    """Seconds one row takes on a worker: ``a + b * uncached_prompt_tokens + c * output_tokens``.

    >>> RowCost(0.1, 0.001, 0.02).seconds(100, 10)
    0.4
    """

    a: float
    b: float
    c: float

    def seconds(self, uncached_prompt_tokens: int, output_tokens: int) -> float:
        """Predicted seconds for one row (never negative)."""
        return max(0.0, self.a + self.b * uncached_prompt_tokens + self.c * output_tokens)


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; ``None`` when singular."""
    n = len(rhs)
    m = [row[:] + [rhs[i]] for i, row in enumerate(matrix)]
    scale = max((abs(v) for row in matrix for v in row), default=0.0) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) <= 1e-12 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit_row_cost(samples: Iterable[tuple[int, int, float]]) -> RowCost:
    """Least-squares :class:`RowCost` from ``(uncached_prompt_tokens, output_tokens, seconds)``.

    When the samples do not vary a term (say every row had the same output length) that term
    is dropped (coefficient 0) and folded into the constant. Raises :class:`ConfigError` with
    no samples or negative values.

    >>> fit_row_cost([(10, 1, 2.0), (10, 1, 4.0)])
    RowCost(a=3.0, b=0.0, c=0.0)
    """
    rows = [(float(p), float(o), float(s)) for p, o, s in samples]
    if not rows:
        msg = "fit_row_cost got no samples; measure at least 3 rows of different lengths"
        raise ConfigError(msg)
    if any(v < 0 for row in rows for v in row):
        msg = "fit_row_cost got a negative token count or time; measurements are >= 0"
        raise ConfigError(msg)
    for terms in ((0, 1, 2), (0, 1), (0, 2), (0,)):
        feats = [[(1.0, p, o)[t] for t in terms] for p, o, _ in rows]
        normal = [
            [sum(f[i] * f[j] for f in feats) for j in range(len(terms))] for i in range(len(terms))
        ]
        rhs = [
            sum(f[i] * r[2] for f, r in zip(feats, rows, strict=True)) for i in range(len(terms))
        ]
        solution = _solve(normal, rhs)
        if solution is not None:
            coef = dict(zip(terms, solution, strict=True))
            return RowCost(coef.get(0, 0.0), coef.get(1, 0.0), coef.get(2, 0.0))
    msg = "fit_row_cost could not fit the samples"
    raise ConfigError(msg)  # pragma: no cover


@dataclass(frozen=True)
class LayerProfile:
    """Per-layer seconds per token on a worker, plus the head, and the activation size.

    ``activation_bytes_per_token`` is hidden size x dtype bytes (the hidden state shipped at a
    layer boundary).

    >>> LayerProfile((0.001, 0.002), 0.0005, 1024).seconds_for(0, 2, tokens=10, head=True)
    0.035
    """

    seconds_per_token: tuple[float, ...]
    head_seconds_per_token: float
    activation_bytes_per_token: int

    def __post_init__(self) -> None:
        values = (*self.seconds_per_token, self.head_seconds_per_token)
        if (
            not self.seconds_per_token
            or any(v < 0 for v in values)
            or self.activation_bytes_per_token < 0
        ):
            msg = (
                "LayerProfile needs at least one layer and non-negative times and bytes, got "
                f"{len(self.seconds_per_token)} layers; re-run the profile"
            )
            raise ConfigError(msg)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers profiled."""
        return len(self.seconds_per_token)

    def seconds_for(self, start: int, stop: int, *, tokens: int, head: bool = False) -> float:
        """Seconds to run layers ``[start, stop)`` (and the head if asked) over ``tokens``."""
        per_token = sum(self.seconds_per_token[start:stop]) + (
            self.head_seconds_per_token if head else 0.0
        )
        return round(per_token * tokens, 12)


@dataclass(frozen=True)
class Link:
    """A network link: ``bandwidth`` bytes/s and ``latency`` seconds per message.

    >>> Link(1e9, 0.001).transfer_seconds(2_000_000)
    0.003
    """

    bandwidth: float
    latency: float

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or self.latency < 0:
            msg = (
                f"Link needs bandwidth > 0 and latency >= 0, got {self.bandwidth} B/s and "
                f"{self.latency} s; re-measure the link"
            )
            raise ConfigError(msg)

    def transfer_seconds(self, nbytes: float, *, messages: int = 1) -> float:
        """Seconds to send ``nbytes`` in ``messages`` messages."""
        return messages * self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class WorkerProfile:
    """What llmsql measured about one worker kind running one model on one machine."""

    kind: str
    model_id: str
    machine: str
    row_cost: RowCost
    layers: LayerProfile | None = None
    concurrency: int = 1

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            msg = f"WorkerProfile concurrency must be >= 1, got {self.concurrency}"
            raise ConfigError(msg)
        if not (self.kind and self.model_id and self.machine):
            msg = "WorkerProfile needs a kind, a model_id and a machine (non-empty)"
            raise ConfigError(msg)

    def to_json(self) -> str:
        """JSON text (``"format": 1``); :meth:`from_json` reads it back.

        >>> p = WorkerProfile("local", "m", "host", RowCost(1.0, 0.0, 0.5), None, 4)
        >>> WorkerProfile.from_json(p.to_json()) == p
        True
        """
        layers = None
        if self.layers is not None:
            layers = {
                "seconds_per_token": list(self.layers.seconds_per_token),
                "head_seconds_per_token": self.layers.head_seconds_per_token,
                "activation_bytes_per_token": self.layers.activation_bytes_per_token,
            }
        body: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "model_id": self.model_id,
            "machine": self.machine,
            "row_cost": {"a": self.row_cost.a, "b": self.row_cost.b, "c": self.row_cost.c},
            "layers": layers,
            "concurrency": self.concurrency,
        }
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerProfile:
        """Read :meth:`to_json` output; :class:`ConfigError` for other versions or bad text."""
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT_VERSION:
                msg = (
                    f"profile format {body.get('format')!r} is not {FORMAT_VERSION}; "
                    "re-run `llmsql profile` to measure it again"
                )
                raise ConfigError(msg)
            lay = body.get("layers")
            layers = None
            if lay is not None:
                layers = LayerProfile(
                    tuple(float(v) for v in lay["seconds_per_token"]),
                    float(lay["head_seconds_per_token"]),
                    int(lay["activation_bytes_per_token"]),
                )
            rc = body["row_cost"]
            return cls(
                str(body["kind"]),
                str(body["model_id"]),
                str(body["machine"]),
                RowCost(float(rc["a"]), float(rc["b"]), float(rc["c"])),
                layers,
                int(body["concurrency"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            msg = (
                f"profile JSON is not valid ({type(exc).__name__}: {exc}); "
                "delete it and re-run `llmsql profile`"
            )
            raise ConfigError(msg) from exc


def _file_name(kind: str, model_id: str, machine: str) -> str:
    key = "\x00".join((kind, model_id, machine))
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{kind}__{model_id}__{machine}")[:80]
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


class ProfileStore:
    """Profiles kept as one JSON file each under ``folder`` (created on first save)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path_for(self, kind: str, model_id: str, machine: str) -> Path:
        """The file that holds the profile of (kind, model, machine)."""
        return self.folder / _file_name(kind, model_id, machine)

    def save(self, profile: WorkerProfile) -> Path:
        """Write ``profile`` atomically (replacing an older one); returns its path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path_for(profile.kind, profile.model_id, profile.machine)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(profile.to_json())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def get(self, kind: str, model_id: str, machine: str) -> WorkerProfile | None:
        """The stored profile, or ``None`` when none was measured yet."""
        path = self.path_for(kind, model_id, machine)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        profile = WorkerProfile.from_json(text)
        if (profile.kind, profile.model_id, profile.machine) != (kind, model_id, machine):
            msg = f"profile file {path} holds another worker's profile; delete it"
            raise ConfigError(msg)
        return profile

    def all(self) -> Sequence[WorkerProfile]:
        """Every stored profile (for ``llmsql profile --list``)."""
        if not self.folder.is_dir():
            return ()
        return tuple(
            WorkerProfile.from_json(p.read_text(encoding="utf-8"))
            for p in sorted(self.folder.glob("*.json"))
        )
