"""A model split at layer ``k`` across two processes (issue 17, SplitLLM's layer split).

The *local* half runs the embedding and decoder layers ``0..k-1``; the *server* half, in a
separate process, runs layers ``k..N-1``, the final norm and the LM head. Only the boundary
hidden states cross (``rows x tokens x hidden``); each half keeps the KV cache of its own
layers. ``k = 0`` puts every layer on the server (the local half only embeds); ``k = N``
leaves only the head there.

Pieces:

- :class:`ModelSource`: how a process gets the model (a folder, or a config and a seed), so
  no weights are sent; :func:`model_identity` fingerprints a loaded model (config and weight
  checksums) and the server refuses a client whose model differs.
- :class:`LocalHalf` and :class:`ServerHalf`: the two halves, each with its own
  ``DynamicCache``.
- :class:`SplitServer`: a context manager that starts the server process ('spawn') listening
  on 127.0.0.1 and connects to it; :class:`SplitGenerator` drives greedy decoding of a batch
  of prompts (left-padded) through it.

Wire protocol (``multiprocessing.connection`` on 127.0.0.1 with a random authkey; each
message is one length-prefixed ``send_bytes`` frame)::

    frame   = u32 big-endian header length | header (UTF-8 JSON) | payload (raw bytes)
    tensor  = header["tensor"] = {"dtype": "float32", "shape": [...]}; payload = the
              tensor's bytes in C order (native byte order: both ends are on one host)

Requests (client -> server), each answered by one reply ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``:

- ``{"op": "hello", "identity": str, "k": int}``: check the model, set the split, clear
  the cache; the reply carries ``"layers"``.
- ``{"op": "forward", "tensor": ..., "positions": [[...]], "mask": [[...]] | null,
  "logits": bool}`` with the hidden states as payload: run the server half; the reply
  carries ``"tokens"`` (the greedy next token of every row) and, when asked, the last
  position's logits as its tensor payload.
- ``{"op": "close"}``: the server replies and exits.

The server process also exits when the connection drops (the client is gone), when no
request comes for ``idle_timeout`` seconds, and when its parent process dies.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llmsql.engine.layers import embed, head, num_layers, run_layers
from llmsql.errors import ConfigError, ExecutionError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from multiprocessing.connection import Connection

    from transformers import PreTrainedModel

HOST = "127.0.0.1"


@dataclass(frozen=True)
class ModelSource:
    """How a process loads the model: a Hugging Face folder, or a config and a seed."""

    path: str | None = None
    config: Any = None
    seed: int = 0
    dtype: str = "float32"

    def load(self) -> PreTrainedModel:
        """Load the model on the CPU."""
        from llmsql.engine.model import from_config, load_model

        if self.path is not None:
            return load_model(self.path, dtype=self.dtype)
        if self.config is None:
            msg = "a ModelSource needs a path or a config; give one of them"
            raise ConfigError(msg)
        return from_config(self.config, seed=self.seed, dtype=self.dtype)


def model_identity(model: PreTrainedModel, /) -> str:
    """A fingerprint of a model: its config and checksums of a few weights (first, middle and
    last parameter: their sum and leading values).
    """
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    params = list(model.parameters())
    with torch.inference_mode():
        for p in (params[0], params[len(params) // 2], params[-1]):
            flat = p.detach().reshape(-1).to(torch.float64)
            digest.update(str(p.dtype).encode())
            digest.update(struct.pack("!d", float(flat.sum())))
            digest.update(flat[:256].numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_k(model: PreTrainedModel, k: int) -> int:
    n = num_layers(model)
    if not 0 <= k <= n:
        msg = f"split point k={k} is outside the model's {n} layers; use 0 <= k <= {n}"
        raise ConfigError(msg)
    return n


class LocalHalf:
    """Embedding and layers ``0..k-1``, with the KV cache of those layers."""

    def __init__(self, model: PreTrainedModel, k: int) -> None:
        """Split ``model`` at ``k`` (``0 <= k <= num_layers``)."""
        _check_k(model, k)
        self.model, self.k = model, k
        self.reset()

    def reset(self) -> None:
        """Forget the cached keys and values (a new batch of prompts)."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """The hidden states leaving layer ``k-1`` for token ids (rows, tokens)."""
        with torch.inference_mode():
            return run_layers(self.model, embed(self.model, ids), 0, self.k,
                              position_ids=positions, attention_mask=mask, cache=self.cache)


class ServerHalf:
    """Layers ``k..N-1`` and the head, with the KV cache of those layers."""

    def __init__(self, model: PreTrainedModel, k: int) -> None:
        """Split ``model`` at ``k`` (``0 <= k <= num_layers``)."""
        self.layers = _check_k(model, k)
        self.model, self.k = model, k
        self.reset()

    def reset(self) -> None:
        """Forget the cached keys and values (a new batch of prompts)."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """The last position's logits (rows, vocab) for hidden states entering layer ``k``."""
        with torch.inference_mode():
            out = run_layers(self.model, hidden, self.k, self.layers, position_ids=positions,
                             attention_mask=mask, cache=self.cache)
            return head(self.model, out[:, -1:])[:, -1]


# ---- wire format ----------------------------------------------------------------------------

def encode(header: dict[str, Any], tensor: torch.Tensor | None = None) -> bytes:
    """One frame: header length, JSON header, and the tensor's raw bytes (if any)."""
    payload = b""
    if tensor is not None:
        t = tensor.detach().contiguous()
        header = {**header, "tensor": {"dtype": str(t.dtype).removeprefix("torch."),
                                       "shape": list(t.shape)}}
        payload = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    text = json.dumps(header).encode()
    return struct.pack("!I", len(text)) + text + payload


def decode(frame: bytes) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The header and the tensor (or None) of a frame written by :func:`encode`."""
    (size,) = struct.unpack_from("!I", frame)
    header: dict[str, Any] = json.loads(frame[4:4 + size])
    spec = header.get("tensor")
    if spec is None:
        return header, None
    raw = torch.frombuffer(bytearray(frame[4 + size:]), dtype=torch.uint8)
    return header, raw.view(getattr(torch, spec["dtype"])).reshape(spec["shape"])


def _tensor_or_none(rows: list[list[int]] | None) -> torch.Tensor | None:
    return None if rows is None else torch.tensor(rows, dtype=torch.long)


# ---- server process -------------------------------------------------------------------------

def _watch_parent() -> None:
    parent = multiprocessing.parent_process()
    while parent is not None and parent.is_alive():
        time.sleep(0.5)
    os._exit(0)


def _serve(source: ModelSource, authkey: bytes, ready: Connection, idle_timeout: float) -> None:
    """The server process: load the model, listen on 127.0.0.1, answer one client."""
    from multiprocessing.connection import Listener

    threading.Thread(target=_watch_parent, daemon=True).start()
    try:
        model = source.load()
        identity = model_identity(model)
        listener = Listener((HOST, 0), authkey=authkey)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        ready.send(f"{type(exc).__name__}: {exc}")
        return
    ready.send(listener.address)
    with listener, listener.accept() as conn:
        half: ServerHalf | None = None
        while conn.poll(idle_timeout):
            try:
                header, tensor = decode(conn.recv_bytes())
            except EOFError:
                return
            op = header.get("op")
            try:
                if op == "close":
                    conn.send_bytes(encode({"ok": True}))
                    return
                if op == "hello":
                    if header["identity"] != identity:
                        msg = (f"the server's model ({identity}, from {_describe(source)}) is "
                               f"not the client's ({header['identity']}); load the same "
                               "model (folder or config and seed) on both sides")
                        raise ConfigError(msg)
                    half = ServerHalf(model, int(header["k"]))
                    conn.send_bytes(encode({"ok": True, "layers": half.layers}))
                elif op == "forward" and half is not None and tensor is not None:
                    logits = half.forward(tensor, torch.tensor(header["positions"]),
                                          _tensor_or_none(header["mask"]))
                    reply = {"ok": True, "tokens": logits.argmax(-1).tolist()}
                    conn.send_bytes(encode(reply, logits if header["logits"] else None))
                else:
                    msg = f"unexpected request {op!r} (say hello first, then forward)"
                    raise ExecutionError(msg, step="split server")
            except (EOFError, BrokenPipeError, ConnectionError):
                return
            except Exception as exc:  # noqa: BLE001 - sent back to the client, which raises
                conn.send_bytes(encode({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))


def _describe(source: ModelSource) -> str:
    return source.path or f"{type(source.config).__name__} seed {source.seed}"


@dataclass
class SplitServer:
    """The server half in its own process, connected: ``with SplitServer(source) as s: ...``.

    Args:
        source: How the server process loads the model.
        start_timeout: Seconds to wait for the process to load the model and listen.
        idle_timeout: The process exits after this many seconds without a request.
        reply_timeout: Seconds to wait for a reply before giving up.
    """

    source: ModelSource
    start_timeout: float = 120.0
    idle_timeout: float = 300.0
    reply_timeout: float = 120.0
    process: Any = field(default=None, init=False)
    sent_bytes: int = field(default=0, init=False)
    _conn: Any = field(default=None, init=False)

    def __enter__(self) -> SplitServer:
        """Start the process and connect to it."""
        from multiprocessing.connection import Client

        ctx = multiprocessing.get_context("spawn")
        authkey = os.urandom(16)
        mine, theirs = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_serve, daemon=True, name="llmsql-split-server",
                                   args=(self.source, authkey, theirs, self.idle_timeout))
        self.process.start()
        theirs.close()
        try:
            if not mine.poll(self.start_timeout):
                msg = (f"the split server did not start within {self.start_timeout:.0f} s; "
                       "raise start_timeout or check that the model loads")
                raise ExecutionError(msg, step="split server")
            try:
                address = mine.recv()
            except EOFError:
                self.process.join(5.0)
                msg = (f"the split server process exited before listening (exit code "
                       f"{self.process.exitcode}); its error is printed above. A script that "
                       "starts one must guard its top level with `if __name__ == '__main__':` "
                       "(the process is spawned and re-imports the main module)")
                raise ExecutionError(msg, step="split server") from None
            if isinstance(address, str):
                msg = f"the split server could not load {_describe(self.source)}: {address}"
                raise ConfigError(msg)
            self._conn = Client(tuple(address), authkey=authkey)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the process."""
        self.close()

    def request(self, header: dict[str, Any], tensor: torch.Tensor | None = None
                ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Send one request, return the reply's header and tensor; raise on an error reply."""
        if self._conn is None:
            msg = "the split server is not running; use it inside `with SplitServer(...)`"
            raise ExecutionError(msg, step="split server")
        frame = encode(header, tensor)
        self.sent_bytes += len(frame)
        self._conn.send_bytes(frame)
        if not self._conn.poll(self.reply_timeout):
            msg = f"the split server sent no reply to {header['op']!r} in {self.reply_timeout} s"
            raise ExecutionError(msg, step="split server")
        reply, out = decode(self._conn.recv_bytes())
        if not reply["ok"]:
            error = reply["error"]
            if error.startswith("ConfigError: "):
                raise ConfigError(error.removeprefix("ConfigError: "))
            msg = f"the split server failed on {header['op']!r}: {error}"
            raise ExecutionError(msg, step="split server")
        return reply, out

    def close(self) -> None:
        """Ask the process to exit, then make sure it has (terminate, then kill)."""
        if self._conn is not None:
            try:
                self._conn.send_bytes(encode({"op": "close"}))
                self._conn.poll(5.0)
            except (OSError, EOFError):
                pass
            self._conn.close()
            self._conn = None
        if self.process is not None:
            self.process.join(5.0)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5.0)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5.0)


# ---- greedy decoding through the split -------------------------------------------------------

@dataclass(frozen=True)
class SplitResult:
    """What :meth:`SplitGenerator.generate` returns.

    Attributes:
        tokens: The generated token ids of each prompt.
        logits: The last step's logits (rows, vocab), float32.
        activation_bytes: Bytes of hidden states shipped to the server, per step (the prefill
            first, then one per decode step).
    """

    tokens: list[list[int]]
    logits: torch.Tensor
    activation_bytes: list[int]

    @property
    def bytes_per_token(self) -> float:
        """Activation bytes per row per decode step (0.0 without decode steps)."""
        decode_steps = self.activation_bytes[1:]
        rows = max(len(self.tokens), 1)
        return sum(decode_steps) / (len(decode_steps) * rows) if decode_steps else 0.0


class SplitGenerator:
    """Greedy decoding with ``model``'s layers ``0..k-1`` here and the rest on ``server``."""

    def __init__(self, model: PreTrainedModel, k: int, server: SplitServer) -> None:
        """Check the server's model against ``model`` and split both at ``k``.

        Raises:
            ConfigError: ``k`` is out of range, or the server's model is another model.
        """
        self.local = LocalHalf(model, k)
        self.server = server
        self.identity = model_identity(model)
        self._hello()

    def _hello(self) -> None:
        self.local.reset()
        self.server.request({"op": "hello", "identity": self.identity, "k": self.local.k})

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> SplitResult:
        """Generate ``max_new_tokens`` greedy tokens for each prompt (no stop tokens).

        Prompts of different lengths are left-padded; the mask hides the padding and the
        positions count only real tokens, on both halves.
        """
        if max_new_tokens < 1 or not prompts or any(len(p) == 0 for p in prompts):
            msg = "generate needs non-empty prompts and max_new_tokens >= 1"
            raise ConfigError(msg)
        self._hello()  # fresh caches on both sides
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        padded = bool((mask == 0).any())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        tokens: list[list[int]] = [[] for _ in prompts]
        sent: list[int] = []
        logits = torch.empty(0)
        for step in range(max_new_tokens):
            last = step == max_new_tokens - 1
            hidden = self.local.forward(ids, positions, mask if padded else None)
            sent.append(hidden.numel() * hidden.element_size())
            reply, out = self.server.request(
                {"op": "forward", "positions": positions.tolist(),
                 "mask": mask.tolist() if padded else None, "logits": last}, hidden)
            for row, token in zip(tokens, reply["tokens"], strict=True):
                row.append(int(token))
            if out is not None:
                logits = out
            ids = torch.tensor(reply["tokens"])[:, None]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        return SplitResult(tokens=tokens, logits=logits, activation_bytes=sent)
