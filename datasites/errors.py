"""Errors of the datasite side. The CLI prints ``str(error)`` as one line and exits non-zero.

DatasiteError
 ├── ConfigError        DIR not initialised, or its config is broken
 ├── TableError         an uploaded table is unreadable or invalid
 ├── ServerError        the server cannot start, stop, or be reached (port in use, not running)
 ├── AuthError          a login was refused (wrong password)
 └── ReviewError        unknown request, refused approval, missing reason
"""


class DatasiteError(Exception):
    """Base of every error the datasites package raises on purpose."""


class ConfigError(DatasiteError):
    pass


class TableError(DatasiteError):
    pass


class ServerError(DatasiteError):
    pass


class AuthError(DatasiteError):
    pass


class ReviewError(DatasiteError):
    pass
