"""Two fixes to syft 0.9.5's server hot path, installed in the datasite's server process only.

Both keep syft's behaviour and remove work that grows with the size of a table:

1. ``attach_attribute_to_syft_object`` walks every service result to stamp server identity on
   the syft objects inside it, and treats ``bytes`` as a Sequence: reading a blob (the private
   table, on every job call) ran an ``isinstance`` check per *byte* of the stored parquet. That
   was ~92% of a call's server time at 100k rows (4 s) and ~25 s at 1M rows. Strings and bytes
   cannot contain syft objects, so the walk now stops at them.
2. ``ActionObject.__check_action_data`` renders ``repr`` and ``str`` of an object's data each
   time one is loaded from the store: four full DataFrame renders per job call (~120 ms of a
   ~350 ms round on the demo table) and strings of private values kept on the object. Nothing in
   the server shows tables to a person, so a DataFrame's repr becomes a one-line shape summary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def _frame_summary(frame: Any) -> str:
    rows, cols = frame.shape
    return f"<DataFrame: {rows} rows x {cols} columns>"


def install() -> None:
    """Patch the imported syft and pandas modules of this process (call after importing syft)."""
    import pandas as pd
    import syft.service.service as service
    import syft.types.syft_object as syft_object

    syft_object.attach_attribute_to_syft_object = attach_attribute_to_syft_object
    service.attach_attribute_to_syft_object = attach_attribute_to_syft_object
    pd.DataFrame.__repr__ = _frame_summary  # type: ignore[method-assign]
