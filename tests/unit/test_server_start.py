"""Issue 26 item 3: the server imports syft without torch and matplotlib (a quarter of its
import, ``datasite launch`` waits on it), and they still import normally afterwards."""

from __future__ import annotations

import subprocess
import sys


def test_syft_loads_without_torch_or_matplotlib_and_they_import_after() -> None:
    probe = (
        "import sys\n"
        "from datasites.serving import syft_patches\n"
        "with syft_patches.optional_imports_deferred():\n"
        "    import syft.server.uvicorn\n"
        "print('DURING', 'torch' in sys.modules, 'matplotlib' in sys.modules)\n"
        "from syft.serde.recursive import TYPE_BANK\n"
        "print('TENSOR', any('torch' in str(k) for k in TYPE_BANK))\n"
        "import torch, matplotlib\n"
        "print('AFTER', torch.zeros(1).shape[0], bool(matplotlib.__version__))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    lines = [
        line
        for line in proc.stdout.splitlines()
        if line.split()[0] in ("DURING", "TENSOR", "AFTER")
    ]
    assert lines == ["DURING False False", "TENSOR False", "AFTER 1 True"], (
        proc.stdout + proc.stderr
    )
