"""``datasites.console.app.server``: what ``datasite console`` serves, and how a program that
serves it from a thread keeps its own logging."""

from __future__ import annotations

import logging
from pathlib import Path

from datasites.console.app import server
from datasites.serving.config import SiteDir, init_site


def _handler(tmp_path: Path) -> logging.FileHandler:
    handler = logging.FileHandler(tmp_path / "own.log")
    logging.getLogger("an.embedding.program").addHandler(handler)
    return handler


def test_a_console_served_from_a_thread_leaves_the_programs_log_handlers_open(
    tmp_path: Path,
) -> None:
    """uvicorn's own logging set-up (dictConfig) closes every handler the process had: in the
    test suite, pytest's log file, after which every test of that worker failed with 'I/O
    operation on closed file'. ``own_logging=False`` leaves them be."""
    init_site(tmp_path / "s", "s", port=1)
    handler = _handler(tmp_path)
    try:
        console = server(SiteDir(tmp_path / "s"), 8999, own_logging=False)
        assert console.config.port == 8999 and console.config.host == "127.0.0.1"
        assert not console.config.proxy_headers  # failed logins counted per client address
        assert not handler.stream.closed
    finally:
        handler.close()


def test_the_command_sets_up_uvicorn_logging_as_before(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The command's default: uvicorn's logging, as ``uvicorn.run`` set it up (recorded, not
    applied: applied here, it would close this worker's own log handlers)."""
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    applied: list[dict] = []
    monkeypatch.setattr(logging.config, "dictConfig", applied.append)
    init_site(tmp_path / "s", "s", port=1)
    server(SiteDir(tmp_path / "s"), 8999)
    assert applied == [LOGGING_CONFIG]
    applied.clear()
    server(SiteDir(tmp_path / "s"), 8999, own_logging=False)
    assert applied == []
