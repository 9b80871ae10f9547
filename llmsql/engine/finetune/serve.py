"""Serve and train several PEFT LoRA adapters on one model: load, switch, add, save, remove.

:class:`AdapterBank` keeps named LoRA adapters injected into the engine's model with PEFT
(``inject_adapter_in_model``: the model keeps its class, so the engine runs it as before) and
says which one runs: :meth:`AdapterBank.use` switches every LoRA layer to one adapter, or
turns them all off for the base model. A LoRA layer with its adapters off computes exactly its
base layer, so base answers are bit-identical to those of a model without adapters.

Served adapters come from PEFT folders (``adapter_config.json`` and
``adapter_model.safetensors``) and are kept in a small least-recently-used set; adapters being
trained are added fresh (:meth:`AdapterBank.add_trainable`) and pinned until removed. Only the
trainable adapters' parameters require grad, whichever adapter runs (PEFT's own
``set_adapter`` would flip ``requires_grad``, so switching here only sets which adapter
each layer runs).

:func:`save_adapter` writes an adapter as PEFT files (``get_peft_model_state_dict`` names
under ``base_model.model.``, as ``PeftModel.save_pretrained`` writes them and vLLM's
``LoRARequest`` reads them) into a folder atomically: a temporary folder beside it, fsynced,
then renamed into place.

Not thread-safe: the caller serializes every call with the model's forward passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmsql.errors import ConfigError, ExecutionError
from llmsql.files import fsync_path

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_CAPACITY = 8
"""Served adapters kept loaded at once (the least recently used one goes first)."""

_PREFIX = "base_model.model."  # PeftModel.save_pretrained's key prefix


def file_digest(path: str | os.PathLike[str], /) -> str:
    """The sha256 (hex) of a file's bytes: an adapter's digest is that of its weights file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def linear_names(model: nn.Module, /) -> list[str]:
    """The attribute names of the model's linear layers (LoRA targets), sorted, e.g.
    ``['down_proj', 'gate_proj', 'k_proj', ...]`` (layers already wrapped by LoRA count by
    their own name).
    """
    names = set()
    for qualified, module in model.named_modules():
        parts = qualified.split(".")
        if isinstance(module, nn.Linear) and not any(p.startswith("lora_") for p in parts):
            parts = [p for p in parts if p != "base_layer"]
            names.add(parts[-1])
    return sorted(names)


def check_targets(model: nn.Module, targets: Sequence[str], /) -> None:
    """Check that every name of ``targets`` names linear layers of ``model``.

    Raises:
        ConfigError: a target matches no linear layer (the message lists those the model
            has), or ``targets`` is empty.
    """
    have = linear_names(model)
    qualified = [q.replace(".base_layer", "") for q, m in model.named_modules()
                 if isinstance(m, nn.Linear) and "lora_" not in q]
    missing = [t for t in targets
               if not any(q == t or q.endswith(f".{t}") for q in qualified)]
    if missing or not targets:
        what = f"has no linear layer named {', '.join(missing)}" if missing else "got none"
        msg = (f"LoRA target_modules: {type(model).__name__} {what}; its linear layers are "
               f"{', '.join(have)} (e.g. target_modules => 'q_proj,v_proj')")
        raise ConfigError(msg)


class AdapterBank:
    """Named LoRA adapters on one model, and which one runs (see the module docstring).

    Args:
        model: The causal LM the engine runs (adapters are injected into it in place).
        capacity: Served adapters kept loaded at once (>= 1).
    """

    def __init__(self, model: nn.Module, /, *, capacity: int = DEFAULT_CAPACITY) -> None:
        """Manage adapters on ``model`` (nothing is injected yet)."""
        if capacity < 1:
            msg = f"AdapterBank capacity = {capacity}; keep at least 1 adapter loaded"
            raise ConfigError(msg)
        self.model = model
        self.capacity = capacity
        self._served: OrderedDict[str, str] = OrderedDict()  # name -> folder, oldest first
        self._trainable: dict[str, list[nn.Parameter]] = {}
        self._active: str | None = None
        self._layers: list[Any] | None = None  # the model's LoRA layers (after injection)

    # ------------------------------------------------------------------ queries
    @property
    def active(self) -> str | None:
        """The adapter that runs now (None: the base model)."""
        return self._active

    def names(self) -> tuple[str, ...]:
        """Every adapter on the model: served ones (oldest use first), then trainable ones."""
        return (*self._served, *self._trainable)

    def __contains__(self, name: object) -> bool:
        """Whether adapter ``name`` is on the model."""
        return name in self._served or name in self._trainable

    # ---------------------------------------------------------------- switching
    def use(self, name: str | None, /) -> None:
        """Run adapter ``name`` from now on (None: the base model, every adapter off).

        Raises:
            ConfigError: no adapter of that name is on the model.
        """
        if name is not None and name not in self:
            msg = (f"adapter {name!r} is not loaded on the model (loaded: "
                   f"{', '.join(self.names()) or 'none'}); load it first")
            raise ConfigError(msg)
        for layer in self._lora_layers():
            layer._disable_adapters = name is None  # noqa: SLF001 -- PEFT's switch, no grad side effects
            layer._active_adapter = [name] if name is not None else []  # noqa: SLF001
        self._active = name
        if name in self._served:
            self._served.move_to_end(name)

    @contextlib.contextmanager
    def using(self, name: str | None, /) -> Iterator[None]:
        """Run adapter ``name`` inside the block, then whatever ran before."""
        before = self._active
        self.use(name)
        try:
            yield
        finally:
            if before is None or before in self:
                self.use(before)
            else:
                self.use(None)

    # ------------------------------------------------------------------ serving
    def load(self, name: str, path: str | os.PathLike[str], /, *,
             label: str | None = None) -> None:
        """Load the PEFT adapter in folder ``path`` as ``name`` (nothing when already loaded).

        Evicts the least recently used served adapter beyond ``capacity``. ``label`` is the
        adapter's name for messages (default: ``name``).

        Raises:
            ConfigError: the folder or one of its files is missing, unreadable, not a LoRA
                adapter, or made for another model (the message names the adapter and the
                folder and says how to fix it).
        """
        if name in self:
            if name in self._served:
                self._served.move_to_end(name)
            return
        folder = Path(path)
        label = name if label is None else label
        config = _read_config(label, folder)
        state = _read_weights(label, folder)
        with self._restoring():
            try:
                self._inject(config, name)
                _set_state(self.model, state, name)
            except Exception as exc:  # boundary: PEFT / torch errors on a bad adapter
                self._drop(name)
                msg = (f"adapter {label!r} in {folder} does not fit this model: {_brief(exc)}; "
                       "train it "
                       "on this base model (CREATE ADAPTER again) or point to its folder")
                raise ConfigError(msg) from exc
        for p in self._params(name):
            p.requires_grad_(False)
        self._served[name] = str(folder)
        while len(self._served) > self.capacity:
            oldest = next(iter(self._served))
            if oldest == self._active:
                break
            self.remove(oldest)

    # ----------------------------------------------------------------- training
    def add_trainable(self, name: str, /, *, rank: int, alpha: float,
                      target_modules: Sequence[str], dropout: float = 0.0,
                      seed: int = 0) -> list[nn.Parameter]:
        """Add a fresh LoRA adapter ``name`` to train (pinned until :meth:`remove`); return
        its parameters (what the optimizer updates), in module order.

        ``A`` is drawn from ``seed`` (PEFT's Kaiming-uniform; the global RNG is left as it
        was) and ``B`` is zero, so the fresh adapter changes nothing. Its dropout applies
        in training mode only (``model.train()``), as PEFT's.

        Raises:
            ConfigError: a target module the model lacks, an adapter of that name exists,
                or bad rank, alpha or dropout.
        """
        from peft import LoraConfig  # type: ignore[import-not-found, unused-ignore]

        if name in self:
            msg = f"adapter {name!r} is already on the model; remove it or pick another name"
            raise ConfigError(msg)
        check_targets(self.model, target_modules)
        try:
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                                lora_dropout=dropout, bias="none")
        except ValueError as exc:
            msg = f"LoRA options of adapter {name!r} are invalid: {exc}"
            raise ConfigError(msg) from exc
        with self._restoring(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._inject(config, name)
        params = self._params(name)
        for p in params:
            p.requires_grad_(True)
        self._trainable[name] = params
        return params

    def parameters(self, name: str, /) -> list[nn.Parameter]:
        """The parameters of adapter ``name``, in module order."""
        return self._params(name)

    def remove(self, name: str, /) -> None:
        """Take adapter ``name`` off the model (nothing if absent); the base model runs if
        it was the active one.
        """
        if name not in self:
            return
        with self._restoring():
            self._drop(name)
        self._served.pop(name, None)
        self._trainable.pop(name, None)
        if self._active == name:
            self.use(None)

    def save(self, name: str, out_dir: str | os.PathLike[str], /, *,
             base_model: str | None = None) -> str:
        """Write adapter ``name`` as PEFT files into ``out_dir`` atomically (see
        :func:`save_adapter`); return the weights' digest.
        """
        return save_adapter(self.model, name, out_dir, base_model=base_model)

    # ---------------------------------------------------------------- internals
    def _inject(self, config: Any, name: str) -> None:
        from peft import inject_adapter_in_model

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters")
            inject_adapter_in_model(config, self.model, adapter_name=name)

    def _lora_layers(self) -> list[Any]:
        if self._layers is None:
            self._layers = _lora_layers(self.model)
        return self._layers

    def _drop(self, name: str) -> None:
        for layer in self._lora_layers():
            for attr in (*layer.adapter_layer_names, *layer.other_param_names):
                store = getattr(layer, attr, None)
                if store is not None and name in store:
                    del store[name]
            frozen = getattr(layer, "frozen_peft_weight_names", None)
            if isinstance(frozen, dict):
                frozen.pop(name, None)
        getattr(self.model, "peft_config", {}).pop(name, None)

    def _params(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters()
                if f".{name}." in n and ".lora_" in n]

    @contextlib.contextmanager
    def _restoring(self) -> Iterator[None]:
        """PEFT's injection may change the active adapters, gradients and training mode of
        every LoRA layer: put back which adapter runs and which parameters train.
        """
        try:
            yield
        finally:
            self._layers = None  # injection may have wrapped more layers
            for p in (p for n, p in self.model.named_parameters() if ".lora_" in n):
                p.requires_grad_(False)
            for params in self._trainable.values():
                for p in params:
                    p.requires_grad_(True)
            self.use(self._active if self._active in self else None)


def _brief(exc: BaseException) -> str:
    """The first two lines of an exception's message (torch lists every mismatched key)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2]) + (" ..." if len(lines) > 2 else "")  # noqa: PLR2004


def _lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer  # type: ignore[import-not-found, unused-ignore]

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _read_config(name: str, folder: Path) -> Any:
    from peft import LoraConfig

    path = folder / CONFIG_FILE
    how = "re-create the adapter (DROP ADAPTER, then CREATE ADAPTER) or fix its path"
    if not path.is_file():
        msg = f"adapter {name!r}: {path} does not exist; {how}"
        raise ConfigError(msg)
    try:
        data = json.loads(path.read_text())
        if data.get("peft_type", "LORA") != "LORA":
            msg = f"it is a {data.get('peft_type')} adapter, not LoRA"
            raise ValueError(msg)  # noqa: TRY301 -- reported below with the path
        return LoraConfig.from_pretrained(str(folder))
    except Exception as exc:  # boundary: JSON and PEFT config errors
        msg = f"adapter {name!r}: {path} is not a valid PEFT LoRA config ({exc}); {how}"
        raise ConfigError(msg) from exc


def _read_weights(name: str, folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    how = "re-create the adapter (DROP ADAPTER, then CREATE ADAPTER) or fix its path"
    if not path.is_file():
        msg = f"adapter {name!r}: {path} does not exist; {how}"
        raise ConfigError(msg)
    try:
        state = load_file(str(path))
    except Exception as exc:  # boundary: safetensors raises its own errors on bad files
        msg = f"adapter {name!r}: {path} is not a readable safetensors file ({exc}); {how}"
        raise ConfigError(msg) from exc
    if not any(".lora_A." in k for k in state):
        msg = f"adapter {name!r}: {path} holds no LoRA weights; {how}"
        raise ConfigError(msg)
    return state


def _set_state(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if unexpected or missing:
        keys = (unexpected or missing)[:3]
        what = "weights the model has no place for" if unexpected else "missing weights"
        msg = f"{what}: {', '.join(keys)}"
        raise ValueError(msg)


# ---------------------------------------------------------------------- saving
def save_adapter(model: nn.Module, name: str, out_dir: str | os.PathLike[str], /, *,
                 base_model: str | None = None) -> str:
    """Write adapter ``name`` of ``model`` as PEFT files into ``out_dir``, atomically.

    The files are written into a temporary folder beside ``out_dir``, fsynced, and renamed
    into place (an existing ``out_dir`` is replaced only once the new folder is complete), so
    a crash or a full disk never leaves a half-written adapter at ``out_dir``.

    Returns:
        The sha256 (hex) of ``adapter_model.safetensors``.

    Raises:
        ExecutionError: writing failed (nothing is left at ``out_dir`` but what was there).
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    target = Path(out_dir)
    config = model.peft_config[name]  # type: ignore[index]
    state = get_peft_model_state_dict(model, adapter_name=name)
    tensors = {_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        _write_config(config, tmp / CONFIG_FILE, base_model)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            fsync_path(tmp / file)
        fsync_path(tmp)
        digest = file_digest(tmp / WEIGHTS_FILE)
        _replace_dir(tmp, target)
        tmp = None
    except OSError as exc:
        msg = (f"writing adapter {name!r} to {target} failed: {exc}; free disk space or "
               "check permissions, then train again (its checkpoint is kept)")
        raise ExecutionError(msg) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return digest


def _write_config(config: Any, path: Path, base_model: str | None) -> None:
    data = config.to_dict()
    data["inference_mode"] = True
    data["base_model_name_or_path"] = base_model
    for key, value in list(data.items()):
        if isinstance(value, set):
            data[key] = sorted(value)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))



def _replace_dir(new: Path, target: Path) -> None:
    """Rename folder ``new`` to ``target``; an existing ``target`` is moved aside first and
    deleted once ``new`` is in place.
    """
    old: Path | None = None
    if target.exists() and any(target.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / "x")
    os.replace(new, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
