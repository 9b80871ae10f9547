"""A local inference worker process owned by llmsql, and the client that talks to it.

The worker hosts exactly one engine, built from a picklable :class:`BackendSpec`, and serves
generate / count_tokens / stats / admin calls over a Unix domain socket. Several clients
(threads of one process, or several processes such as Spark executors) can use one worker
at once; their batches are merged into the engine, so they share one model load and one
prefix KV cache.

Lifecycle:

- :func:`connect_or_start` (or constructing :class:`WorkerClient`) attaches to the worker
  listening at the spec's well-known path (``<tmp>/llmsql-<uid>/w-<digest>.sock``), or starts
  one with ``python -m llmsql.backends.worker``. A file lock makes concurrent starters agree
  on a single worker; the others attach to it.
- The client that started the worker *owns* it: ``close()`` (or garbage collection, or
  interpreter exit) shuts the worker down. Attached clients only disconnect.
- The worker also exits when its owner process dies (``--parent-pid`` watchdog), and when
  no client has been connected for ``idle_timeout`` seconds.
- Everything the worker (and the engine's own processes) print goes to a log file next to
  the socket; error messages name it.

The wire format is a length-prefixed pickle of :class:`~.protocol.Call` /
:class:`~.protocol.Reply`; a ``generate`` reply's value is a :class:`~.protocol.Generated`,
which also carries what the engine's expert offload measured for that batch
(:meth:`WorkerClient.moe_stats` sums them per client, :attr:`WorkerStats.moe` is the
worker's total). It is only spoken between llmsql's own processes of one user: the
socket lives in a private (0700) directory, is created with mode 0600, and the worker
rejects peers of another uid.

The package has three modules: :mod:`.protocol` (messages, framing, paths, the start lock:
what both sides share), :mod:`.server` (the worker process) and :mod:`.client`
(:class:`WorkerClient`, starting and attaching). The server never imports the client nor
the client the server. This package re-exports the client side and the shared names;
``python -m llmsql.backends.worker`` (:mod:`.__main__`) runs :func:`.server.main`.
"""

from __future__ import annotations

from llmsql.backends.worker.client import WorkerClient, connect_or_start
from llmsql.backends.worker.protocol import (
    ADMIN_CALLS,
    CLIENT_OPTIONS,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_STARTUP_TIMEOUT,
    PROTOCOL_VERSION,
    Generated,
    WorkerInfo,
    WorkerStats,
    default_socket_path,
    file_lock,
    private_dir,
    spec_digest,
)

__all__ = [
    "ADMIN_CALLS",
    "CLIENT_OPTIONS",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_STARTUP_TIMEOUT",
    "PROTOCOL_VERSION",
    "Generated",
    "WorkerClient",
    "WorkerInfo",
    "WorkerStats",
    "connect_or_start",
    "default_socket_path",
    "file_lock",
    "private_dir",
    "spec_digest",
]
