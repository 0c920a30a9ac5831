"""Fixes to syft 0.9.5's server hot path, installed in the datasite's server process only.

Each keeps syft's behaviour and removes work that is repeated or grows with a table's size:

1. ``attach_attribute_to_syft_object`` walks every service result to stamp server identity on
   the syft objects inside it, and treats ``bytes`` as a Sequence: reading a blob (the private
   table, on every job call) ran an ``isinstance`` check per *byte* of the stored parquet. That
   was ~92% of a call's server time at 100k rows (4 s) and ~25 s at 1M rows. Strings and bytes
   cannot contain syft objects, so the walk now stops at them.
2. ``ObjectStash.get_role``, called for each permission check (many per request), turns the
   caller's whole stored User row into a pydantic ``User`` to read its role: ~24% of a job
   call's server CPU. The role is now memoised on the row's exact stored content, so a changed
   row (new role, deleted user) is read afresh; the same row always gives the same role.
3. ``ActionObject.__check_action_data`` renders ``repr`` and ``str`` of an object's data each
   time one is loaded from the store: four full DataFrame renders per job call (~120 ms of a
   ~350 ms round on the demo table) and strings of private values kept on the object. Nothing in
   the server shows tables to a person, so :func:`summarise_dataframe_repr` patches *pandas*
   (``DataFrame.__repr__``) in the server process: a one-line shape summary.
4. ``datasite launch`` waits mostly on syft's import, a quarter of which was torch (for a tensor
   serializer) and matplotlib (for pandas' table styling): :func:`optional_imports_deferred`.

These patches, and ``datasites.training.runtime.caller_code``, rest on syft 0.9.5's private names; the
server refuses to start on any other syft (:func:`check_syft_version`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

_LEAVES = (str, bytes, bytearray, memoryview)


def attach_attribute_to_syft_object(result: Any, attr_dict: dict[str, Any]) -> None:
    """syft's function with one change: strings and bytes are leaves, not sequences to walk."""
    from syft.types.result import Err, Ok
    from syft.types.syft_object import SyftBaseObject

    if isinstance(result, _LEAVES):
        return
    if isinstance(result, Ok):
        iterator: Any = (result.ok(),)
    elif isinstance(result, Err):
        iterator = (result.err(),)
    elif isinstance(result, Mapping):
        iterator = result.values()
    elif isinstance(result, Sequence):
        iterator = result
    else:
        iterator = (result,)
    for item in iterator:
        if isinstance(item, SyftBaseObject):
            for name, value in attr_dict.items():
                setattr(item, name, value)
            for field in item.model_fields:
                attach_attribute_to_syft_object(getattr(item, field), attr_dict)


@functools.lru_cache(maxsize=256)
def _role_of_row(fields: str) -> Any:
    from syft.serde.json_serde import deserialize_json

    return deserialize_json(json.loads(fields)).role


def get_role(self: Any, credentials: Any, session: Any = None) -> Any:
    """syft's ``ObjectStash.get_role`` with the row -> role deserialisation memoised."""
    from syft.service.user.user import User
    from syft.service.user.user_roles import ServiceRole
    from syft.store.db.schema import PostgresBase, SQLiteBase

    base = SQLiteBase if self._is_sqlite() else PostgresBase
    if base.metadata.tables.get("User") is None:
        return ServiceRole.GUEST
    row = self.query(User).filter("verify_key", "eq", credentials).execute(session).first()
    if row is None:
        return ServiceRole.GUEST
    return _role_of_row(json.dumps(row.fields, sort_keys=True))


def _frame_summary(frame: Any) -> str:
    rows, cols = frame.shape
    return f"<DataFrame: {rows} rows x {cols} columns>"


SYFT_VERSION = "0.9.5"


def check_syft_version() -> None:
    """Refuse any syft but the one whose private names these patches and the runtime read."""
    import syft

    from datasites.errors import ConfigError

    if syft.__version__ != SYFT_VERSION:
        raise ConfigError(
            f"syft {syft.__version__} is installed; this datasite needs syft=={SYFT_VERSION} "
            "(its patches and the runtime's caller check read syft's private names)"
        )


Restore = Callable[[], None]


def install() -> Restore:
    """Patch the imported syft modules of this process; returns what undoes it (for tests)."""
    import syft.service.service as service
    import syft.types.syft_object as syft_object
    from syft.store.db.stash import ObjectStash, with_session

    check_syft_version()
    saved = (ObjectStash.get_role, syft_object.attach_attribute_to_syft_object)
    ObjectStash.get_role = with_session(get_role)
    syft_object.attach_attribute_to_syft_object = attach_attribute_to_syft_object
    service.attach_attribute_to_syft_object = attach_attribute_to_syft_object

    def restore() -> None:
        ObjectStash.get_role = saved[0]
        syft_object.attach_attribute_to_syft_object = saved[1]
        service.attach_attribute_to_syft_object = saved[1]

    return restore


def summarise_dataframe_repr() -> Restore:
    """Patch pandas: ``repr``/``str`` of any DataFrame in this process is a shape summary."""
    import pandas as pd

    saved = pd.DataFrame.__repr__
    pd.DataFrame.__repr__ = _frame_summary  # type: ignore[method-assign]

    def restore() -> None:
        pd.DataFrame.__repr__ = saved  # type: ignore[method-assign]

    return restore


DEFERRED = ("torch", "matplotlib")


class _Deferred:
    """A meta path finder that answers the import of a :data:`DEFERRED` package with
    ImportError (see :func:`optional_imports_deferred`)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in DEFERRED:
            raise ImportError(f"{name}: deferred while syft loads (datasites.serving)")


@contextlib.contextmanager
def optional_imports_deferred() -> Iterator[None]:
    """Import syft without torch and matplotlib: 1.3-1.5 s of its 5.5 s of CPU here.

    Both are optional imports, each inside a ``try: ... except ImportError``: syft 0.9.5's only
    ``import torch`` registers a serializer for tensors, and pandas' ``Styler`` (which syft's
    table rendering imports) loads ``matplotlib.pyplot`` for colour gradients. Nothing a
    datasite exchanges over syft is a tensor (weights travel as ``.npz`` strings,
    ``policies.wire``; training runs in the sandbox's own processes), so syft refuses a tensor
    on the wire as it refuses any type it does not know; and the server styles no table. Only
    the imports during syft's own are refused: later ones in this process (the review's model
    builder, the console's plots) work as usual.
    """
    finder = _Deferred()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
