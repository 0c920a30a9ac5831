"""The federation file: which datasites a researcher works with, and how to log in to each.

```toml
[[sites]]
name = "hospital-a"
url = "http://127.0.0.1:8081"
email = "ada@uni.edu"
password_file = "secrets/hospital-a"   # or: password_env = "HOSPITAL_A_PASSWORD"
# over HTTPS, trust the site by its certificate's SHA-256 (datasite init prints it)
fingerprint = "3f1c...e9"                # or: ca_file = "certs/hospital-a.pem"
```
Passwords are never written inline; a relative ``password_file`` or ``ca_file`` is read from the
file's folder. An ``https://`` site with neither is checked against the system's CAs.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from researcher.errors import FederationError


@dataclass(frozen=True)
class SiteLogin:
    name: str
    url: str
    email: str
    password_file: Path | None = None
    password_env: str | None = None
    fingerprint: str | None = None  # pinned SHA-256 of the site's TLS certificate
    ca_file: Path | None = None

    def trust(self) -> Any:
        """How syft's connection to this site checks its certificate (``policies.tls``)."""
        from policies.tls import Trust

        return Trust(self.ca_file, self.fingerprint)

    def password(self) -> str:
        if self.password_env:
            value = os.environ.get(self.password_env)
            if not value:
                raise FederationError(
                    f"{self.name}: environment variable {self.password_env} is not set"
                )
            return value
        assert self.password_file is not None
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise FederationError(
                f"{self.name}: cannot read password file {self.password_file}: {exc.strerror}"
            ) from exc


@dataclass(frozen=True)
class Federation:
    sites: list[SiteLogin]
    path: Path

    @classmethod
    def load(cls, path: Path) -> Federation:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise FederationError(f"federation file {path} not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise FederationError(f"federation file {path} is not valid TOML: {exc}") from exc
        unknown = sorted(set(data) - {"sites"})
        if unknown:
            raise FederationError(f"{path}: unknown key(s) {', '.join(unknown)}; only [[sites]]")
        raw = data.get("sites")
        if not isinstance(raw, list) or not raw:
            raise FederationError(f"{path}: no [[sites]] entries")
        sites = [_site(entry, path.parent, i) for i, entry in enumerate(raw)]
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise FederationError(f"{path}: site names must be unique")
        return cls(sites, path)

    def site(self, name: str) -> SiteLogin:
        for s in self.sites:
            if s.name == name:
                return s
        raise FederationError(f"no site named {name!r} in {self.path}")


SITE_KEYS = {"name", "url", "email", "password_file", "password_env", "fingerprint", "ca_file"}


def _site(entry: dict, base: Path, index: int) -> SiteLogin:
    unknown = sorted(set(entry) - SITE_KEYS - {"password"})
    if unknown:
        who = entry.get("name") or f"#{index + 1}"
        raise FederationError(
            f"site {who}: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(SITE_KEYS))}"
        )
    missing = [k for k in ("name", "url", "email") if not entry.get(k)]
    if missing:
        raise FederationError(f"site #{index + 1} lacks {', '.join(missing)}")
    if "password" in entry:
        raise FederationError(
            f"site {entry['name']}: inline passwords are not accepted; "
            "use password_file or password_env"
        )
    pf, pe = entry.get("password_file"), entry.get("password_env")
    if bool(pf) == bool(pe):
        raise FederationError(
            f"site {entry['name']}: give exactly one of password_file or password_env"
        )
    path = _relative(base, pf)
    url = str(entry["url"]).rstrip("/")
    fingerprint, ca = entry.get("fingerprint"), entry.get("ca_file")
    if (fingerprint or ca) and not url.startswith("https://"):
        raise FederationError(
            f"site {entry['name']}: fingerprint and ca_file are for an https:// url, not {url}"
        )
    if fingerprint and ca:
        raise FederationError(f"site {entry['name']}: give fingerprint or ca_file, not both")
    if fingerprint:
        from policies.tls import TLSError, check_fingerprint

        try:
            fingerprint = check_fingerprint(str(fingerprint))
        except TLSError as exc:
            raise FederationError(f"site {entry['name']}: {exc}") from exc
    return SiteLogin(
        entry["name"], url, entry["email"], path, pe, fingerprint or None, _relative(base, ca)
    )


def _relative(base: Path, value: str | None) -> Path | None:
    if not value:
        return None
    return Path(value) if Path(value).is_absolute() else base / value
