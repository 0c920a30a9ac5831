"""Dataset metadata as both sides see it: written by the datasite into the asset's description
(target, row count, schema, published feature statistics), read back by researchers."""

from __future__ import annotations

import json
from typing import Any

META_PREFIX = "fedsite-meta: "


def format_meta(meta: dict[str, Any]) -> str:
    return META_PREFIX + json.dumps(meta, sort_keys=True)


def parse_meta(description: str) -> dict[str, Any]:
    """The metadata in an asset description, or {} when there is none or it is broken."""
    text = str(description or "")
    start = text.find(META_PREFIX)
    if start < 0:
        return {}
    try:
        meta = json.loads(text[start + len(META_PREFIX) :].strip().splitlines()[0])
    except (json.JSONDecodeError, IndexError):
        return {}
    return meta if isinstance(meta, dict) else {}
