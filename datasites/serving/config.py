"""A datasite's directory: its TOML config, stable identity and admin secret.

Layout of DIR::

    site.toml        name, port, host, db_url (its password removed), admin email, server id
                     (no secrets)
    identity.key     the server's signing key (0600)
    admin-password   the generated admin password (0600)
    db-password      the password of ``--db-url``, when it has one (0600)
    state/           syft's SQLite database and blobs (SYFT_TEMP_ROOT)
    site.db          this project's ledger, audit log and approvals (with a postgresql://
                     db_url they live in that database instead, schema 'datasite')
    policies.json    per-dataset access policies
    datasets.json    per-dataset metadata: target column, row count, schema
    server.pid, server.log
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import tomllib
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tomli_w

from datasites.errors import ConfigError

CONFIG_FILE = "site.toml"
PASSWORD_FILE = "admin-password"
KEY_FILE = "identity.key"
SPLIT_KEY_FILE = "split.key"
TLS_CERT_FILE = "tls.crt"
TLS_KEY_FILE = "tls.key"  # 0600
DEFAULT_PORT = 8081
ADMIN_EMAIL = "admin@fedsite.io"
DB_PASSWORD_FILE = "db-password"  # 0600; site.toml keeps the URL without it


@dataclass(frozen=True)
class SiteConfig:
    name: str
    port: int
    server_uid: str
    host: str = "127.0.0.1"
    db_url: str = ""
    admin_email: str = ADMIN_EMAIL
    secure_noise: bool = True  # kept so older site.toml files load; noise is always secure
    tls: bool = False  # HTTPS only, with tls.crt / tls.key in DIR

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class SiteDir:
    """Paths of one datasite's directory, and the operations that read its files."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def db_path(self) -> Path:
        return self.root / "site.db"

    @property
    def site_db(self) -> Path | str:
        """Where the site's own tables live: the PostgreSQL database of ``--db-url`` (beside
        syft's store, so one backup holds both), else ``site.db`` in DIR."""
        from datasites.ledger.store import is_postgres

        url = self.db_url()
        return url if is_postgres(url) else self.db_path

    def db_url(self) -> str:
        """The ``--db-url`` with its password, which lives in ``db-password`` (0600), never in
        site.toml."""
        url = self.config().db_url
        secret = self.root / DB_PASSWORD_FILE
        if not url or not secret.exists():
            return url
        from sqlalchemy.engine import make_url

        full = make_url(url).set(password=_read_secret(secret))
        return full.render_as_string(hide_password=False)

    @property
    def pid_path(self) -> Path:
        return self.root / "server.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def policies_path(self) -> Path:
        return self.root / "policies.json"

    @property
    def datasets_path(self) -> Path:
        return self.root / "datasets.json"

    def config(self) -> SiteConfig:
        if not self.config_path.is_file():
            raise ConfigError(f"{self.root} is not an initialised datasite (run 'datasite init')")
        try:
            data = tomllib.loads(self.config_path.read_text())
            return SiteConfig(**data["site"])
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.config_path} is broken: {exc}") from exc

    def admin_password(self) -> str:
        return _read_secret(self.root / PASSWORD_FILE)

    def signing_key(self) -> str:
        return _read_secret(self.root / KEY_FILE)

    def fingerprint(self) -> str:
        """SHA-256 of the site's public identity key: its name in secure-aggregation peers."""
        from policies.secagg import fingerprint, identity_of, public_bytes

        return fingerprint(public_bytes(identity_of(self.signing_key()).public_key()))

    @property
    def tls_cert(self) -> Path:
        return self.root / TLS_CERT_FILE

    @property
    def tls_key(self) -> Path:
        return self.root / TLS_KEY_FILE

    def tls_fingerprint(self) -> str:
        """SHA-256 of the site's certificate: what researchers pin; '' without TLS."""
        from policies.tls import fingerprint

        return fingerprint(self.tls_cert.read_bytes()) if self.config().tls else ""

    def split_key(self) -> bytes:
        """The site's key for validation splits (0600); made on first use for older sites."""
        path = self.root / SPLIT_KEY_FILE
        if not path.exists():
            _write_secret(path, secrets.token_hex(32))
        return bytes.fromhex(_read_secret(path))

    def datasets_meta(self) -> dict[str, dict[str, Any]]:
        if not self.datasets_path.exists():
            return {}
        return json.loads(self.datasets_path.read_text())

    def save_dataset_meta(self, name: str, meta: dict[str, Any]) -> None:
        data = self.datasets_meta()
        data[name] = meta
        _atomic_write(self.datasets_path, json.dumps(data, indent=2, sort_keys=True))


def keep_private() -> None:
    """Files this process creates from now on are its owner's alone (0600, folders 0700).

    A site directory holds the private table (syft's database and blob store), the ledger and
    the logs; syft creates them with the default umask, readable by every local user.
    """
    os.umask(0o077)


def init_site(
    root: Path,
    name: str,
    port: int = DEFAULT_PORT,
    db_url: str = "",
    host: str = "127.0.0.1",
    tls: tuple[bytes, bytes] | None = None,
) -> SiteConfig:
    """Create DIR with config, identity and a fresh admin password; refuse to overwrite one.

    ``tls``: (key PEM, certificate PEM): the site then serves HTTPS only.
    """
    site = SiteDir(root)
    if site.config_path.exists():
        raise ConfigError(f"{root} already holds a datasite; pick another --dir")
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"site name {name!r} may hold only letters, digits, '-', '_' and '.'")
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is outside 1-65535")
    keep_private()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    db_url, db_password = _split_password(db_url)
    config = SiteConfig(
        name=name,
        port=port,
        server_uid=uuid.uuid4().hex,
        host=host,
        db_url=db_url,
        tls=tls is not None,
    )
    if db_password:
        _write_secret(root / DB_PASSWORD_FILE, db_password)
    if tls is not None:
        _write_secret(root / TLS_KEY_FILE, tls[0].decode())
        _write_secret(root / TLS_CERT_FILE, tls[1].decode())
    _write_secret(root / KEY_FILE, secrets.token_hex(32))  # an ed25519 seed, as syft stores it
    _write_secret(root / PASSWORD_FILE, secrets.token_urlsafe(24))
    _write_secret(root / SPLIT_KEY_FILE, secrets.token_hex(32))
    (root / "state").mkdir(exist_ok=True)
    _atomic_write(site.config_path, tomli_w.dumps({"site": asdict(config)}))
    return config


def _split_password(db_url: str) -> tuple[str, str | None]:
    """(the URL without its password, the password): the password goes to its own 0600 file."""
    if not db_url:
        return db_url, None
    from sqlalchemy.engine import URL, make_url

    url = make_url(db_url)
    if url.password is None:
        return db_url, None
    bare = URL.create(
        url.drivername, url.username, None, url.host, url.port, url.database, url.query
    )
    return bare.render_as_string(hide_password=False), str(url.password)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
