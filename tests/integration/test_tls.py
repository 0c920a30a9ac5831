"""A datasite over HTTPS only: the admin and a researcher who pins its certificate work as over
HTTP; a wrong fingerprint is refused in one line; plain HTTP gets nowhere."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import pytest

from datasites.review.queue import ReviewQueue
from datasites.serving.config import SiteDir
from policies import tls
from researcher import api
from researcher.federation import Federation
from tests.conftest import Site, free_port, last_json, run_cli
from tests.integration.conftest import EMAIL, job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def https_site(tmp_path_factory, breast_cancer_csv: Path):
    root = tmp_path_factory.mktemp("tls")
    site = Site(root / "hospital-a", "hospital-a", free_port())
    made = run_cli(
        "datasite",
        "init",
        site.name,
        "--dir",
        str(site.dir),
        "--port",
        str(site.port),
        "--self-signed",
    )
    printed = made.stdout.split("(SHA-256, researchers pin it):")[1].split()[0]
    site.cli("launch", "--detach")
    try:
        site.cli(
            "upload", "--name", "cancer", "--file", str(breast_cancer_csv), "--target", "target"
        )
        password = last_json(site.cli("users", "add", "--email", EMAIL, "--name", "Ada", "--json"))
        (root / "ada.pw").write_text(password["password"])
        site.cli("policy", "set", "--dataset", "cancer", "--allow-domain", "uni.edu")
        site.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "10")
        yield root, site, printed
    finally:
        site.cli("stop", check=False)


def _federation(root: Path, site: Site, scheme: str, fingerprint: str | None) -> Path:
    lines = [
        "[[sites]]",
        f'name = "{site.name}"',
        f'url = "{scheme}://127.0.0.1:{site.port}"',
        f'email = "{EMAIL}"',
        'password_file = "ada.pw"',
    ]
    if fingerprint:
        lines.append(f'fingerprint = "{fingerprint}"')
    path = root / f"fed-{scheme}-{(fingerprint or 'none')[:6]}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_served_certificate_is_the_one_printed_and_shown(https_site) -> None:
    root, site, printed = https_site
    status = last_json(site.cli("status", "--json"))
    assert status["url"].startswith("https://") and status["responding"] is True
    served = ssl.get_server_certificate(("127.0.0.1", site.port))
    assert hashlib.sha256(ssl.PEM_cert_to_DER_cert(served)).hexdigest() == printed
    assert status["tls_fingerprint"] == printed
    assert (site.dir / "tls.key").stat().st_mode & 0o777 == 0o600


def test_a_pinned_researcher_trains_over_https(https_site, tmp_path: Path) -> None:
    root, site, printed = https_site
    fed = Federation.load(_federation(root, site, "https", printed))
    spec = job({"rounds": 1, "noise_multiplier": 1.5, "batch_size": 64})
    api.submit(fed, spec)
    queue = ReviewQueue(SiteDir(site.dir))
    queue.approve(next(i for i in queue.items() if i.job_name == spec.name).request_id)
    result = api.train(fed, spec, tmp_path / "run")
    assert [list(r["sites"]) for r in result.rounds] == [["hospital-a"]]


def test_a_wrong_fingerprint_or_plain_http_gets_nowhere(https_site) -> None:
    root, site, printed = https_site
    wrong = ("0" if printed[0] != "0" else "1") + printed[1:]
    proc = run_cli(
        "researcher", "datasets", "-f", str(_federation(root, site, "https", wrong)), check=False
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert any("TLS certificate is not the one trusted" in line for line in lines), lines
    plain = run_cli(
        "researcher", "datasets", "-f", str(_federation(root, site, "http", None)), check=False
    )
    assert "no datasite answers" in plain.stdout + plain.stderr or plain.returncode != 0
    assert "cancer" not in plain.stdout


def test_init_takes_a_certificate_and_key_and_refuses_half_of_them(tmp_path: Path) -> None:
    key, cert = tls.self_signed("127.0.0.1")
    (tmp_path / "k.pem").write_bytes(key)
    (tmp_path / "c.pem").write_bytes(cert)
    made = run_cli(
        "datasite",
        "init",
        "s",
        "--dir",
        str(tmp_path / "s"),
        "--port",
        "9443",
        "--tls-cert",
        str(tmp_path / "c.pem"),
        "--tls-key",
        str(tmp_path / "k.pem"),
    )
    assert tls.fingerprint(cert) in made.stdout and "https://127.0.0.1:9443" in made.stdout
    half = run_cli(
        "datasite",
        "init",
        "t",
        "--dir",
        str(tmp_path / "t"),
        "--tls-cert",
        str(tmp_path / "c.pem"),
        check=False,
    )
    assert half.returncode == 1 and "go together" in half.stderr and not (tmp_path / "t").exists()
