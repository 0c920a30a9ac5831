"""Write the bytecode of what the suite's processes import, once, before they start.

``scripts/setup`` installs no bytecode (uv writes none; compiling the whole venv took 26 s), and
Python writes a module's ``.pyc`` at its first import. In a new venv (a clean clone: CI) the
three pytest workers and the server zygote started together and each compiled syft, torch,
Opacus, pandas and scikit-learn for itself (about 12 CPU-s each, on two cores) until one of
them had written the files. This process imports all of it first, alone, while mypy runs on
the other core (``scripts/test``); with the bytecode already written it returns at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

# heavy third-party modules whose bytecode tells whether this venv was warmed
_MARKERS = ("syft", "torch", "opacus", "sklearn", "pandas")
_OURS = ("policies", "datasites", "researcher")


def _written(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return True  # not installed: nothing to warm
    return Path(importlib.util.cache_from_source(spec.origin)).exists()


def main() -> int:
    if sys.flags.dont_write_bytecode or all(map(_written, _MARKERS)):
        return 0
    from tests import conftest, server_zygote  # noqa: F401  pytest, pandas, scikit-learn

    server_zygote._preload()  # syft, uvicorn, the site runtime, the accountant
    for name in server_zygote.TRAINER_PRELOAD:  # torch, torch._dynamo, Opacus, the engines
        importlib.import_module(name)
    for package in _OURS:  # the CLIs, the researcher's client, the console
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            importlib.import_module(info.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
