"""Print the README's Quickstart command number N (1: install and run, 2: install and test).

.ci/run runs what this prints, so CI runs the README's commands exactly as written. Only the
standard library: it runs before anything is installed.
"""

from __future__ import annotations

import pathlib
import re
import sys


def commands(readme: str) -> list[str]:
    """The ```sh blocks of the README's Quickstart section, in order."""
    section = readme.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def main() -> None:
    """Print command ``sys.argv[1]`` (1-based)."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    print(commands(readme)[int(sys.argv[1]) - 1])


if __name__ == "__main__":
    main()
