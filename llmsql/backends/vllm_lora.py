"""LoRA adapters on the vLLM engine (multi-LoRA): what :class:`~llmsql.backends.vllm.VLLMEngine`
needs to serve requests with an :class:`~llmsql.backends.base.AdapterRef`.

- :func:`adapter_rank` reads a PEFT folder's rank (``adapter_config.json``: ``r`` and any
  larger ``rank_pattern`` entry); :func:`rank_slot` rounds it up to a ``max_lora_rank``
  vLLM accepts.
- :class:`LoraRequests` turns adapters into ``vllm.lora.request.LoRARequest``: one stable
  integer id per adapter digest (vLLM keeps loaded adapters by id), and a name that carries
  the digest, because vLLM keys its prefix cache by the LoRA name: an adapter retrained
  under the same name must never reuse the old weights' KV blocks.
- :func:`lora_problem` says why a request's adapter cannot run (files missing, rank beyond
  vLLM's largest, LoRA switched off), for the request's ``Response.error``.

The engine options (``enable_lora``, ``max_lora_rank``, ``max_loras``, ``max_cpu_loras``) are
documented in :mod:`llmsql.backends.vllm`; :func:`lora_kwargs` turns them into ``vllm.LLM``
arguments. Nothing here imports vLLM at module level.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from typing import TYPE_CHECKING, Any

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from llmsql.backends.base import AdapterRef, BackendSpec

RANK_SLOTS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM accepts (``vllm.config.lora.MaxLoRARanks``)."""
DEFAULT_LORA_RANK = 16
"""``max_lora_rank`` of an engine built with ``enable_lora=True`` and no ``max_lora_rank``
(vLLM's default)."""
DEFAULT_MAX_LORAS = 4
"""Different adapters one engine step may run together (vLLM's ``max_loras``; vLLM's own
default is 1). Requests of further adapters wait for a free slot."""
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
"""A PEFT folder's weight files (either one)."""
_HEX = re.compile(r"[0-9a-f]{8,64}")


def rank_slot(rank: int, /) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``rank``.

    Raises:
        ConfigError: ``rank`` is beyond vLLM's largest (512) or not positive.

    >>> rank_slot(8), rank_slot(9), rank_slot(300)
    (8, 16, 320)
    >>> rank_slot(600)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    llmsql.errors.ConfigError: LoRA rank 600 is beyond vLLM's largest max_lora_rank (512); ...
    """
    for slot in RANK_SLOTS:
        if rank <= slot:
            if rank < 1:
                break
            return slot
    msg = (f"LoRA rank {rank} is beyond vLLM's largest max_lora_rank ({RANK_SLOTS[-1]}); "
           "train the adapter with rank => 512 or less")
    if rank < 1:
        msg = f"LoRA rank {rank} is not a positive integer; check the adapter's adapter_config.json"
    raise ConfigError(msg)


def adapter_rank(path: str | pathlib.Path, /) -> int:
    """The rank of the PEFT adapter in folder ``path`` (the largest of ``r`` and its
    ``rank_pattern`` values).

    Raises:
        ConfigError: the folder has no readable ``adapter_config.json`` or no weights file,
            or the config names no rank.
    """
    folder = pathlib.Path(path)
    config = folder / "adapter_config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        msg = (f"cannot read the LoRA adapter config {config} ({exc}); the adapter folder must "
               "hold PEFT's adapter_config.json and adapter_model.safetensors")
        raise ConfigError(msg) from exc
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        msg = (f"the LoRA adapter folder {folder} has no {' or '.join(WEIGHT_FILES)}; "
               "re-create the adapter (CREATE ADAPTER) or restore its files")
        raise ConfigError(msg)
    _check_safetensors(folder / WEIGHT_FILES[0])
    ranks = [data.get("r")]
    pattern = data.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks += list(pattern.values())
    ints = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    if not ints:
        msg = f"{config} names no LoRA rank ('r'); it is not a PEFT LoRA adapter config"
        raise ConfigError(msg)
    return max(ints)


def _check_safetensors(path: pathlib.Path) -> None:
    """Read the header of a ``.safetensors`` weights file (if there is one): vLLM raises
    from inside its engine step on a corrupt one, which fails the whole batch.

    Raises:
        ConfigError: the file is not readable safetensors or holds no tensor.
    """
    if not path.is_file():
        return
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
    except Exception as exc:  # safetensors raises its own error types (and OSError)
        msg = (f"the LoRA adapter weights {path} cannot be read ({exc}); re-create the adapter "
               "(CREATE ADAPTER) or restore its files")
        raise ConfigError(msg) from exc
    if not names:
        msg = f"the LoRA adapter weights {path} hold no tensor; re-create the adapter"
        raise ConfigError(msg)


def check_digest(ref: AdapterRef, /) -> None:
    """Check that the weights in ``ref.path`` are the ones ``ref.digest`` names, as the
    transformers backend does: a digest written in hex (8 to 64 digits) must begin the sha256
    of ``adapter_model.safetensors`` (other digests, and ``.bin`` weights, are not checked).

    Raises:
        ConfigError: the weights changed since the adapter was recorded.
    """
    path = pathlib.Path(ref.path) / WEIGHT_FILES[0]
    if not _HEX.fullmatch(ref.digest) or not path.is_file():
        return
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(ref.digest):
        msg = (f"adapter {ref.name!r}: the weights in {path} changed since the adapter was "
               f"recorded (digest {ref.digest[:16]}, file {h.hexdigest()[:16]}); re-create "
               "the adapter (DROP ADAPTER, then CREATE ADAPTER)")
        raise ConfigError(msg)


def lora_mode(spec: BackendSpec, /) -> bool | None:
    """The ``enable_lora`` option: True (LoRA from the start), False (never: requests with an
    adapter get an error) or None (not set: the engine is rebuilt with LoRA when the first
    request with an adapter arrives).
    """
    value = spec.option("enable_lora")
    return None if value is None else bool(value)


def lora_kwargs(spec: BackendSpec, rank: int | None, /) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments that turn LoRA on, for adapters up to rank ``rank``.

    ``max_lora_rank`` is the larger of ``rank`` and the spec's ``max_lora_rank`` option,
    rounded up by :func:`rank_slot`; with neither, :data:`DEFAULT_LORA_RANK`.

    >>> from llmsql.backends.base import BackendSpec
    >>> lora_kwargs(BackendSpec.make("vllm"), 8)
    {'enable_lora': True, 'max_lora_rank': 8, 'max_loras': 4}
    >>> lora_kwargs(BackendSpec.make("vllm"), None)["max_lora_rank"]
    16
    >>> lora_kwargs(BackendSpec.make("vllm", max_lora_rank=32, max_loras=2, max_cpu_loras=8), 8)
    {'enable_lora': True, 'max_lora_rank': 32, 'max_loras': 2, 'max_cpu_loras': 8}
    """
    option = spec.option("max_lora_rank")
    if rank is None and option is None:
        rank = DEFAULT_LORA_RANK
    wanted = max(rank or 1, int(option or 1))
    kwargs: dict[str, Any] = {
        "enable_lora": True,
        "max_lora_rank": rank_slot(wanted),
        "max_loras": int(spec.option("max_loras", DEFAULT_MAX_LORAS)),
    }
    if spec.option("max_cpu_loras") is not None:
        kwargs["max_cpu_loras"] = int(spec.option("max_cpu_loras"))
    return kwargs


def check_lora_options(spec: BackendSpec, /) -> None:
    """Reject LoRA option values vLLM would refuse later.

    Raises:
        ConfigError: ``max_lora_rank`` is out of range, ``max_loras`` is below 1, or
            ``max_cpu_loras`` is below ``max_loras``.
    """
    rank = spec.option("max_lora_rank")
    if rank is not None:
        rank_slot(int(rank))
    loras = int(spec.option("max_loras", DEFAULT_MAX_LORAS))
    if loras < 1:
        msg = f"vllm option max_loras={loras} must be at least 1"
        raise ConfigError(msg)
    cpu = spec.option("max_cpu_loras")
    if cpu is not None and int(cpu) < loras:
        msg = f"vllm option max_cpu_loras={cpu} must be at least max_loras ({loras})"
        raise ConfigError(msg)


class LoraRequests:
    """Adapters as vLLM ``LoRARequest`` objects, and what the engine must be built for.

    Ids are given out per digest, from 1, for the engine's lifetime: the same weights keep
    their id (vLLM reuses the loaded adapter) and new weights get a new one. Ranks are read
    once per folder.
    """

    def __init__(self) -> None:
        """No adapter seen yet."""
        self._ids: dict[str, int] = {}
        self._ranks: dict[str, int] = {}

    def rank(self, ref: AdapterRef, /) -> int:
        """The adapter's rank (its folder read, and its digest checked, once).

        Raises:
            ConfigError: the folder is not a readable PEFT LoRA adapter, or its weights are
                not the ones its digest names.
        """
        key = f"{ref.digest}\0{ref.path}"
        if key not in self._ranks:
            rank = adapter_rank(ref.path)
            check_digest(ref)
            self._ranks[key] = rank
        return self._ranks[key]

    def request(self, ref: AdapterRef | None, /) -> Any:
        """The ``LoRARequest`` for ``ref`` (None for the base model)."""
        if ref is None:
            return None
        from vllm.lora.request import LoRARequest

        lora_id = self._ids.setdefault(ref.digest, len(self._ids) + 1)
        return LoRARequest(f"{ref.name}@{ref.digest[:16]}", lora_id, ref.path)


def lora_problem(ref: AdapterRef, mode: bool | None, rank_of: LoraRequests) -> str | None:
    """Why a request with adapter ``ref`` cannot run on this engine (None: it can).

    ``mode`` is :func:`lora_mode` of the engine's spec.
    """
    if mode is False:
        return (f"adapter {ref.name!r}: this vllm backend was built with enable_lora=False; "
                "drop that option (the engine then turns LoRA on when an adapter is first "
                "used) or set enable_lora=True")
    try:
        rank_slot(rank_of.rank(ref))
    except ConfigError as exc:
        return f"adapter {ref.name!r}: {exc}"
    return None
