"""The admin channel (``datasites.serving.channel``): the commands reach their own server through
a 0600 Unix socket with a launch token, import no syft, and nobody else gets in."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from datasites.serving import channel
from tests.conftest import Site, last_json

pytestmark = pytest.mark.integration


def _raw(site: Site, payload: bytes) -> dict:
    """One line to the socket, as an attacker on this machine would send it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        with channel.unix_address(channel.socket_path(site.dir)) as address:
            sock.connect(address)
        sock.sendall(payload + b"\n")
        sock.shutdown(socket.SHUT_WR)
        return json.loads(channel.read_line(sock, 1 << 20))


def _users(site: Site) -> list[str]:
    return [u["email"] for u in last_json(site.cli("users", "list", "--json"))]


def test_socket_and_token_are_the_owners_only(site: Site) -> None:
    for path in (channel.socket_path(site.dir), channel.token_path(site.dir)):
        assert path.exists() and (path.stat().st_mode & 0o777) == 0o600, path
    token = channel.token_path(site.dir).read_text().strip()
    assert len(token) >= 40
    assert token not in (site.dir / "server.log").read_text()  # never logged


def test_a_wrong_or_missing_token_is_refused_and_changes_nothing(site: Site) -> None:
    before = _users(site)
    add = {"email": "mallory@evil.org", "name": "M"}
    attempts = [
        json.dumps({"op": "users_add", "args": add}).encode(),  # no token
        json.dumps({"op": "users_add", "token": "", "args": add}).encode(),
        json.dumps({"op": "users_add", "token": "x" * 43, "args": add}).encode(),
        json.dumps({"op": "users_add", "token": None, "args": add}).encode(),
        b"not json at all",
    ]
    for payload in attempts:
        reply = _raw(site, payload)
        assert reply["ok"] is False and "result" not in reply, reply
    assert _users(site) == before and "mallory@evil.org" not in before
    # the right token, but fields that are not the call's: refused too, before any handler
    token = channel.token_path(site.dir).read_text().strip()
    for args in ({**add, "role": "ADMIN"}, {"email": 1, "name": "M"}, {}):
        reply = _raw(site, json.dumps({"op": "users_add", "token": token, "args": args}).encode())
        assert reply["ok"] is False, (args, reply)
    assert _users(site) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
def test_another_local_user_can_neither_connect_nor_read_the_token(site: Site) -> None:
    """Attack: a second account on the site's machine (uid 65534) tries the socket and token."""
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "out = []\n"
        "try:\n"
        "    open(sys.argv[2]).read(); out.append('token read')\n"
        "except PermissionError:\n"
        "    out.append('token refused')\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1]); out.append('connected')\n"
        "except PermissionError:\n"
        "    out.append('socket refused')\n"
        "print(','.join(out))\n"
    )
    sock, token = channel.socket_path(site.dir), channel.token_path(site.dir)
    if len(str(sock)) > 100:
        pytest.skip("socket path too long to pass as one address")
    # the site's directory is 0700: the other user would not even reach the files; open it
    # and its parents to others' search (x) to test the files' own modes, then restore each
    # mode whole: restoring only the 0o777 bits once took /tmp's sticky bit away, for every
    # later run on the machine too (and with it the accounting cache, which refuses such a
    # parent: policies/accounting_cache.py)
    parents = [p for p in site.dir.parents if p != Path("/")]
    saved = {p: stat.S_IMODE(p.stat().st_mode) for p in [site.dir, *parents]}
    opened = {p: m for p, m in saved.items() if m & 0o011 != 0o011}
    try:
        for p, m in opened.items():
            p.chmod(m | 0o011)
        proc = subprocess.run(
            [sys.executable, "-c", code, str(sock), str(token)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for p, m in opened.items():
            p.chmod(m)
    assert proc.stdout.strip() == "token refused,socket refused", proc.stdout + proc.stderr
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in saved} == saved


def test_a_researchers_syft_login_cannot_do_what_the_channel_does(site: Site) -> None:
    """Attack: a researcher logs in with syft and tries the admin's operations there."""
    creds = last_json(site.cli("users", "add", "--email", "rex@uni.edu", "--name", "Rex", "--json"))
    client = site.login("rex@uni.edu", creds["password"])
    before = _users(site)
    with pytest.raises(Exception, match="no permission"):
        client.register(
            name="M", email="mallory@evil.org", password="pw123456", password_verify="pw123456"
        )
    with pytest.raises(Exception):  # noqa: B017  syft's own permission error
        client.api.services.user.update(uid=client.account.id, role="ADMIN")
    assert _users(site) == before
    roles = {u["email"]: u["role"] for u in last_json(site.cli("users", "list", "--json"))}
    assert roles["rex@uni.edu"] == "DATA_SCIENTIST"
    # the token and the socket are nowhere on the HTTP side
    import ssl
    import urllib.error
    import urllib.request

    from datasites.serving.config import SiteDir

    context = ssl.create_default_context(cafile=str(SiteDir(site.dir).tls_cert))
    for path in ("/admin-token", "/admin.sock", "/api/v2/admin"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{site.url}{path}", timeout=10, context=context)
        assert refused.value.code == 404


def test_admin_commands_import_no_syft(site: Site) -> None:
    """What made each command 15-90 s: a fresh process importing syft and logging in."""
    d = str(site.dir)
    code = (
        "import sys, json\n"
        "from tests.conftest import run_cli\n"
        "runs = [\n"
        "    run_cli('datasite', 'requests', '--dir', sys.argv[1], '--json', check=False),\n"
        "    run_cli('datasite', 'users', 'list', '--dir', sys.argv[1], check=False),\n"
        "    run_cli('datasite', 'budget', '--dir', sys.argv[1], check=False),\n"
        "    run_cli('datasite', 'approve', 'ffffffff', '--dir', sys.argv[1], check=False),\n"
        "    run_cli('datasite', 'budget', 'set', '--dir', sys.argv[1], '--researcher', 'a@b.c',\n"
        "            '--dataset', 'nope', '--epsilon', '1', check=False),\n"
        "]\n"
        "heavy = [m for m in ('syft', 'torch', 'opacus') if m in sys.modules]\n"
        "print(json.dumps({'codes': [r.returncode for r in runs], 'heavy': heavy,\n"
        "                  'err': [r.stderr.strip() for r in runs]}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, d], capture_output=True, text=True, timeout=120
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], out
    assert out["codes"] == [0, 0, 0, 1, 1], out
    assert out["err"][3] == "error: no request with id 'ffffffff'", out
    assert "no dataset 'nope'" in out["err"][4], out


def test_bad_budget_is_refused_before_any_heavy_import(tmp_path: Path) -> None:
    from datasites.serving.config import init_site

    init_site(tmp_path / "s", "s", port=1)
    (tmp_path / "s" / "datasets.json").write_text(json.dumps({"d": {"dataset": "d"}}))
    code = (
        "import sys\n"
        "from datasites.cli import main\n"
        "sys.argv = ['datasite', 'budget', 'set', '--dir', sys.argv[1], '--researcher', 'a@b.c',"
        " '--dataset', 'd', '--epsilon', 'inf']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    heavy = [m for m in ('syft', 'torch', 'opacus', 'pandas') if m in sys.modules]\n"
        "    print(exc.code, heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True
    )
    assert proc.stdout.strip() == "1 []", proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "error: a budget needs a finite epsilon > 0 and 0 < delta < 1"
    ), proc.stderr
