"""The private table at rest: a Parquet file in the site's own directory, beside syft.

Why: syft 0.9.5 serialises an asset's table several times on upload (Parquet, then its own
capnp chunks), signs the whole message and copies it into its blob store; at 1M rows x 30 that
was 27-38 s and 2.3 GB in the uploading process, 3.4 GB in the server (README, "Scale"). The
private rows never need syft: only the site's own runtime reads them. So the syft asset's
private half is a one-row stub naming the file (private like any asset data: a researcher
cannot read it), the DP mock stays a real syft twin for researchers, and a round reads the rows
from the file (Parquet: about 0.3 s for 1M x 30).

The file is written under a random name before anything is uploaded and removed again if the
upload fails, so a refused or failed upload leaves nothing behind; everything under the site
directory is 0600 (the CLI and the server set umask 077).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

import pandas as pd

from datasites.errors import Refused

log = logging.getLogger("datasites.data.store")

STUB_COLUMNS = ["fedsite_table", "rows"]
TABLES_DIR = "tables"


def tables_dir(root: Path) -> Path:
    return Path(root) / TABLES_DIR


def write_private(root: Path, name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Write ``frame`` as the dataset's Parquet file; the stub that the syft asset holds."""
    folder = tables_dir(root)
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{name}-{secrets.token_hex(8)}.parquet"
    tmp = path.with_suffix(".tmp")
    try:
        frame.to_parquet(tmp, index=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return pd.DataFrame({STUB_COLUMNS[0]: [path.name], STUB_COLUMNS[1]: [len(frame)]})


def remove_private(root: Path, stub: pd.DataFrame) -> None:
    """Undo ``write_private`` (an upload that failed after the file was written)."""
    _path(root, stub).unlink(missing_ok=True)


def is_stub(data: Any) -> bool:
    return isinstance(data, pd.DataFrame) and list(data.columns) == STUB_COLUMNS


def read_private(root: Path, data: Any) -> pd.DataFrame:
    """The private rows behind the asset's data: from the site's Parquet file when the asset
    holds a stub, else the table itself (a dataset uploaded before the site kept its files)."""
    if not is_stub(data):
        return pd.DataFrame(data)
    path = _path(root, data)
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        # the cause (with this site's paths) goes to the admin's log, not into the reply
        log.error("private table unreadable: %s", exc)
        raise Refused(
            "the dataset's private table cannot be read at this site; its admin can see why "
            "in the server log"
        ) from exc
    if len(frame) != int(data[STUB_COLUMNS[1]].iloc[0]):
        raise Refused("the dataset's private table is not the one uploaded; nothing ran")
    return frame


def _path(root: Path, stub: pd.DataFrame) -> Path:
    name = str(stub[STUB_COLUMNS[0]].iloc[0])
    if Path(name).name != name or not name.endswith(".parquet"):
        raise Refused("the dataset's stub names no table file of this site")
    return tables_dir(root) / name
