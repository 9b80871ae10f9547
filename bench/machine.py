"""What a benchmark ran on, recorded beside its figures: CPU model, cores (all and usable),
load average, Python and the time (UTC). Scripts add their own package versions."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**versions: str) -> dict[str, Any]:
    """The machine, its load and the time, plus ``versions`` (package -> version)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), **versions,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
