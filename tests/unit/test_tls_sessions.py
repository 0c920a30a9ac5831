"""Pinned sessions against a real TLS server on loopback: the shared context of fingerprint pins
trusts nothing by itself, and a connection no longer loads the system's CA bundle."""

from __future__ import annotations

import http.server
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from policies import tls


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Counting(http.server.HTTPServer):
    """Counts the connections it accepts (each a TLS handshake, good or refused); with
    ``drop`` > 0 it hangs up that many connections before their handshake, as a loaded server
    can."""

    accepted = 0
    drop = 0
    context: ssl.SSLContext

    def get_request(self):  # noqa: ANN202
        sock, address = self.socket.accept()
        self.accepted += 1
        if self.drop > 0:
            self.drop -= 1
            # read the ClientHello first: closing with it unread sends a reset, not the end of
            # the stream that a handshake cut short by the server shows the client
            sock.recv(4096)
            sock.close()
            raise OSError("dropped before the handshake")  # handle_request skips it
        return self.context.wrap_socket(sock, server_side=True), address


def _serve(tmp_path: Path, name: str) -> tuple[str, str, _Counting]:
    key, cert = tls.self_signed("127.0.0.1")
    (tmp_path / f"{name}.crt").write_bytes(cert)
    (tmp_path / f"{name}.key").write_bytes(key)
    server = _Counting(("127.0.0.1", 0), _Hello)
    server.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.context.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"https://127.0.0.1:{server.server_address[1]}/", tls.fingerprint(cert), server


@pytest.fixture
def two_sites(tmp_path: Path) -> Iterator[list[tuple[str, str, _Counting]]]:
    served = [_serve(tmp_path, name) for name in ("a", "b")]
    yield served
    for _, _, server in served:
        server.shutdown()
        server.server_close()


def test_each_pin_admits_its_own_site_only_though_they_share_a_context(two_sites) -> None:  # noqa: ANN001
    (url_a, pin_a, _), (url_b, pin_b, _) = two_sites
    for url, pin in ((url_a, pin_a), (url_b, pin_b)):
        assert tls.post_once(url, b"ping", {}, tls.Trust(fingerprint=pin)) == b"ping"
    # after both were admitted through the one context, each pin still refuses the other site
    for url, other in ((url_a, pin_b), (url_b, pin_a)):
        with pytest.raises(requests.exceptions.SSLError, match="Fingerprints did not match"):
            tls.post_once(url, b"ping", {}, tls.Trust(fingerprint=other))
    with tls.pinned_session(tls.Trust(fingerprint=pin_a)) as kept:  # one session, two sites
        assert kept.post(url_a, data=b"x").content == b"x"
        with pytest.raises(requests.exceptions.SSLError):
            kept.post(url_b, data=b"x")


def test_a_pinned_connection_loads_no_ca_bundle(two_sites, monkeypatch) -> None:  # noqa: ANN001
    (url, pin, _), _ = two_sites
    tls._fingerprint_context()  # made before the bundle is forbidden: once per process

    def forbidden(self, *args: object) -> None:  # noqa: ANN001
        raise AssertionError("the system CA bundle was loaded for a pinned connection")

    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", forbidden)
    for _ in range(3):  # a fresh connection each: post_once's way
        assert tls.post_once(url, b"ping", {}, tls.Trust(fingerprint=pin)) == b"ping"
    assert tls._fingerprint_context().cert_store_stats()["x509_ca"] == 0  # it trusts no CA


def test_a_certificate_that_is_not_the_pinned_one_is_refused_at_once(two_sites) -> None:  # noqa: ANN001
    """One handshake, no retries: three retries with backoff made the one-line refusal wait 3 s."""
    (url, _, server), (_, other, _) = two_sites
    before = server.accepted
    with pytest.raises(requests.exceptions.SSLError):
        tls.post_once(url, b"ping", {}, tls.Trust(fingerprint=other))
    assert server.accepted - before == 1


def test_a_handshake_cut_short_is_retried_and_the_round_gets_through(two_sites) -> None:  # noqa: ANN001
    """Not every TLS failure is a refusal: an EOF in the handshake (a loaded server) is retried,
    as before; without it a round lost its site to "certificate not trusted" in a suite run."""
    (url, pin, server), _ = two_sites
    server.drop, before = 2, server.accepted
    assert tls.post_once(url, b"ping", {}, tls.Trust(fingerprint=pin)) == b"ping"
    assert server.accepted - before == 3


def _connect_proxy() -> tuple[str, list[str]]:
    """An HTTPS proxy that tunnels CONNECT as asked (what ``HTTPS_PROXY`` names at many
    institutions): the TLS inside is between the client and the site. Returns its URL and the
    list of the HOST:PORT it was asked to tunnel to."""
    tunnelled: list[str] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def tunnel(client: socket.socket) -> None:
        asked = b""
        while b"\r\n\r\n" not in asked:
            asked += client.recv(4096)
        host, port = asked.split()[1].decode().rsplit(":", 1)
        tunnelled.append(f"{host}:{port}")
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with client, upstream:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 5)
                if not ready:
                    return
                for end in ready:
                    data = end.recv(65536)
                    if not data:
                        return
                    (upstream if end is client else client).sendall(data)

    def accept() -> None:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=tunnel, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", tunnelled


def test_a_pin_holds_through_an_https_proxy(two_sites, monkeypatch) -> None:  # noqa: ANN001
    """Red team, session 14: with HTTPS_PROXY set, the pin lived on the direct pool only, and a
    pinned session took any certificate through the proxy's tunnel."""
    (url_a, pin_a, _), (_, pin_b, _) = two_sites
    proxy, tunnelled = _connect_proxy()
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    monkeypatch.setenv("NO_PROXY", "")
    with pytest.raises(requests.exceptions.SSLError, match="Fingerprints did not match"):
        tls.post_once(url_a, b"ping", {}, tls.Trust(fingerprint=pin_b))
    assert tls.post_once(url_a, b"ping", {}, tls.Trust(fingerprint=pin_a)) == b"ping"
    assert len(tunnelled) == 2  # both went through the proxy
