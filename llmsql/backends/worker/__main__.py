"""``python -m llmsql.backends.worker``: run the worker process (:func:`.server.main`).

The server runs from its importable module :mod:`llmsql.backends.worker.server`, never as
``__main__``: the messages it pickles name :mod:`llmsql.backends.worker.protocol` classes,
which clients can unpickle.
"""

from __future__ import annotations

import logging
import os

if __name__ == "__main__":
    from llmsql.backends.worker.server import main

    _code = main()
    logging.shutdown()
    os._exit(_code)  # the engine is closed; skip the slow torch/vLLM interpreter teardown
