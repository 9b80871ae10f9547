#!/usr/bin/env bash
# Redraw docs/architecture.md's import graph (between its ```mermaid fences).
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import re, subprocess, sys, pathlib
doc = pathlib.Path("docs/architecture.md")
graph = subprocess.run([sys.executable, "scripts/import_graph.py", "--mermaid"],
                       capture_output=True, text=True, check=True).stdout.rstrip("\n")
text = re.sub(r"```mermaid\n.*?\n```", lambda m: f"```mermaid\n{graph}\n```", doc.read_text(),
              count=1, flags=re.S)
doc.write_text(text)
PY
