"""LoRA adapters as catalog objects (torch-free): the statements and the catalog.

- :mod:`llmsql.adapters.statements`: ``CREATE ADAPTER`` / ``SHOW ADAPTERS`` /
  ``DROP ADAPTER`` text -> typed statements.
- :mod:`llmsql.adapters.options`: the ``USING LORA (...)`` options.
- :mod:`llmsql.adapters.catalog`: :class:`AdapterRecord` and :class:`AdapterCatalog`, one
  JSON file per adapter, written atomically.

Training and serving (torch) live in :mod:`llmsql.engine`; this package never imports it.
"""

from __future__ import annotations

from llmsql.adapters.catalog import STATUSES, AdapterCatalog, AdapterRecord, check_base_model
from llmsql.adapters.options import OPTION_NAMES, LoraOptions, lora_options
from llmsql.adapters.statements import (
    ADAPTER_FUNCTIONS,
    AdapterCall,
    AdapterStatement,
    CreateAdapter,
    DropAdapter,
    ShowAdapters,
    is_adapter_statement,
    parse_adapter_statement,
)

__all__ = [
    "ADAPTER_FUNCTIONS",
    "OPTION_NAMES",
    "STATUSES",
    "AdapterCall",
    "AdapterCatalog",
    "AdapterRecord",
    "AdapterStatement",
    "CreateAdapter",
    "DropAdapter",
    "LoraOptions",
    "ShowAdapters",
    "check_base_model",
    "is_adapter_statement",
    "lora_options",
    "parse_adapter_statement",
]
