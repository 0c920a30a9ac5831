"""The admin console over real HTTP (uvicorn on loopback) in front of a real datasite.

An admin logs in, opens a pending request, approves it through the page; the syft request is
then approved for the researcher and the audit log holds the approval. As the attacker: no
page without a login, no POST without the session's CSRF token, wrong passwords locked out,
and a logged-out session is dead.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from researcher import api
from tests.conftest import free_port
from tests.integration.conftest import EMAIL, events, job

pytestmark = pytest.mark.integration
SITE_NAMES = ("hospital-a",)


@pytest.fixture(scope="module")
def console(federation):
    """``datasite console`` as an admin runs it: a child process serving on a loopback port."""
    fed, (site,) = federation
    site.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "10")
    port = free_port()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "datasites.cli",
            "console",
            "--dir",
            str(site.dir),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/login", timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield fed, site, url
    finally:
        child.terminate()
        child.wait(10)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_log_in_review_and_approve_a_pending_request(console, tmp_path: Path) -> None:
    fed, site, url = console
    spec = job({"rounds": 1, "noise_multiplier": 1.5, "batch_size": 64})
    api.submit(fed, spec)
    with httpx.Client(base_url=url, timeout=60.0) as web:
        assert web.get("/").headers["location"] == "/login"  # no page without a login
        assert web.post("/login", data={"password": "wrong"}).status_code == 401
        home = web.post("/login", data={"password": site.password}, follow_redirects=True)
        assert home.status_code == 200 and spec.name in home.text
        assert (
            home.headers["x-frame-options"] == "DENY"
            and "no-store" in home.headers["cache-control"]
        )
        cookie = web.cookies.get("fedsite_console")
        rid = re.search(r'href="/requests/([0-9a-f]+)"', home.text).group(1)
        page = web.get(f"/requests/{rid}")
        assert "Linear" in page.text and "Estimated epsilon" in page.text and "pending" in page.text
        (tmp_path / "request.html").write_text(page.text)
        # a POST without the CSRF token, or with another, changes nothing
        assert web.post(f"/requests/{rid}/decide", data={"action": "approve"}).status_code == 403
        forged = {"action": "approve", "csrf": "x" * 43}
        assert web.post(f"/requests/{rid}/decide", data=forged).status_code == 403
        assert api.status(fed, spec)["hospital-a"]["status"] == "pending"
        done = web.post(
            f"/requests/{rid}/decide",
            data={"action": "approve", "csrf": _csrf(page.text)},
            follow_redirects=True,
        )
        assert done.status_code == 200 and "approved" in done.text
        assert api.status(fed, spec)["hospital-a"]["status"] == "approved"
        assert "approved" in events(site)
        for path in ("/budget", "/audit"):
            shown = web.get(path)
            assert shown.status_code == 200
        assert "Hash chain verified" in web.get("/audit").text
        plot = web.get("/epsilon.png")
        assert plot.headers["content-type"] == "image/png" and plot.content[:4] == b"\x89PNG"
        web.post("/logout", data={"csrf": _csrf(done.text)})
    with httpx.Client(base_url=url, cookies={"fedsite_console": cookie}, timeout=60.0) as stale:
        assert stale.get("/").headers["location"] == "/login"  # the session died at logout


def test_deny_needs_a_reason_and_the_researcher_sees_it(console) -> None:
    fed, site, url = console
    spec = job({"rounds": 1, "noise_multiplier": 1.5, "batch_size": 64})
    api.submit(fed, spec)
    with httpx.Client(base_url=url, timeout=60.0) as web:
        home = web.post("/login", data={"password": site.password}, follow_redirects=True)
        rid = next(
            m
            for m in re.findall(
                r'href="/requests/([0-9a-f]+)"[^<]*</a></td>\s*<td>([^<]+)', home.text
            )
            if m[1] == spec.name
        )[0]
        token = _csrf(home.text)
        empty = web.post(f"/requests/{rid}/decide", data={"action": "deny", "csrf": token})
        assert empty.status_code == 400 and "reason" in empty.text
        web.post(
            f"/requests/{rid}/decide",
            data={"action": "deny", "reason": "<b>not this quarter</b>", "csrf": token},
        )
        shown = web.get(f"/requests/{rid}").text
        assert "&lt;b&gt;not this quarter&lt;/b&gt;" in shown  # escaped, never interpreted
    assert api.status(fed, spec)["hospital-a"] == {
        "status": "denied",
        "reason": "<b>not this quarter</b>",
    }


def test_repeated_wrong_passwords_lock_the_login(console) -> None:
    _, site, url = console
    with httpx.Client(base_url=url, timeout=60.0) as web:
        for _ in range(5):
            assert web.post("/login", data={"password": "guess"}).status_code == 401
        locked = web.post("/login", data={"password": site.password})
        assert locked.status_code == 401 and "too many failed logins" in locked.text
