"""Image input fetching: limits, and refusals of non-public destinations (SSRF).

Loopback is refused by default, which is exactly where a test server must live. So the positive
and redirect cases name the test server's port in `AddressPolicy.allowed_endpoints` (an operator's
explicit exception for one ip:port) and prove that anything else, including a redirect hop to a
second port of the same host, is still refused.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from generation.errors import FetchError, UnsafeAddress
from generation.fetch import FetchLimits, ImageFetcher
from generation.netguard import AddressPolicy
from tests.generation.gen_support import png_bytes, serve

PNG = png_bytes(64, 48, (10, 200, 30))


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "JPEG")
    return buf.getvalue()


class ImageServer:
    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.app = Starlette(
            routes=[
                Route("/img.png", self.image),
                Route("/text", lambda r: Response("<html>", media_type="text/html")),
                Route("/mismatch", lambda r: Response(_jpeg(), media_type="image/png")),
                Route("/wide.png", lambda r: Response(png_bytes(5000, 4), media_type="image/png")),
                Route("/big", self.big),
                Route("/redirect", self.redirect),
                Route("/missing", lambda r: Response("no", status_code=404)),
            ]
        )

    async def image(self, request: Request) -> Response:
        self.hosts.append(request.headers["host"])
        return Response(PNG, media_type="image/png")

    async def big(self, request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(64):  # 4 MiB, chunked: no Content-Length to trust
                yield b"\0" * 65536

        return StreamingResponse(chunks(), media_type="image/png")

    async def redirect(self, request: Request) -> Response:
        return RedirectResponse(request.query_params["to"], status_code=302)


@pytest.fixture
async def server() -> AsyncIterator[tuple[ImageServer, int, int]]:
    srv = ImageServer()
    async with serve(srv.app, ports=2) as (a, b):
        yield srv, a, b


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def test_data_urls() -> None:
    fetcher = ImageFetcher(limits=FetchLimits(max_bytes=100_000))
    try:
        image = await fetcher.fetch(_data_url(PNG))
        assert (image.data, image.content_type, image.width, image.height) == (
            PNG,
            "image/png",
            64,
            48,
        )
        cases = {
            "bad_type": [_data_url(PNG, "text/plain"), _data_url(_jpeg(), "image/png")],
            "bad_data_url": [
                "data:image/png,rawbytes",
                "data:image/png;base64,@@@@",
                "data:nocomma",
            ],
            "too_large": [_data_url(b"\0" * 200_000)],
            "too_many_pixels": [_data_url(png_bytes(5000, 4))],
            "undecodable": [_data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)],
        }
        for reason, urls in cases.items():
            for url in urls:
                with pytest.raises(FetchError) as err:
                    await fetcher.fetch(url)
                assert err.value.reason == reason, url[:40]
    finally:
        await fetcher.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/x.png",
        "http://localhost:1/x.png",  # a DNS name that resolves to loopback
        "http://10.1.2.3/x.png",
        "http://192.168.0.10/x.png",
        "http://172.16.5.5/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/x.png",
        "http://0.0.0.0/x.png",
        "http://224.0.0.1/x.png",
        "http://[::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://[64:ff9b::a00:1]/x.png",  # NAT64 of 10.0.0.1
        "http://[fe80::1]/x.png",
        "http://[fd00::1]/x.png",
        "http://2130706433/x.png",  # 127.0.0.1 as a decimal integer
    ],
)
async def test_non_public_destinations_are_refused(url: str) -> None:
    fetcher = ImageFetcher()
    try:
        with pytest.raises(UnsafeAddress):
            await fetcher.fetch(url)
    finally:
        await fetcher.aclose()


async def test_metadata_and_multicast_stay_refused_when_private_is_allowed() -> None:
    fetcher = ImageFetcher(policy=AddressPolicy(allow_private=True))
    try:
        for url in ("http://169.254.169.254/latest/", "http://224.0.0.1/", "http://0.0.0.0/"):
            with pytest.raises(UnsafeAddress):
                await fetcher.fetch(url)
    finally:
        await fetcher.aclose()


async def test_bad_urls() -> None:
    fetcher = ImageFetcher()
    try:
        for url in ("ftp://example.com/x.png", "http://user:pw@example.com/x.png", "nonsense"):
            with pytest.raises(FetchError) as err:
                await fetcher.fetch(url)
            assert err.value.reason == "bad_url"
    finally:
        await fetcher.aclose()


def test_public_addresses_pass_the_policy() -> None:
    policy = AddressPolicy()
    for ip in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"):
        policy.check(ipaddress.ip_address(ip), 443)


async def test_fetch_from_allowed_endpoint_connects_to_the_resolved_address(
    server: tuple[ImageServer, int, int],
) -> None:
    srv, a, b = server
    fetcher = ImageFetcher(policy=AddressPolicy(allowed_endpoints=frozenset({("127.0.0.1", a)})))
    try:
        got = await fetcher.fetch(f"http://localhost:{a}/img.png")
        assert got.data == PNG and (got.width, got.height) == (64, 48)
        # Connected to the checked IP; the server still saw the name the user gave.
        assert srv.hosts == [f"localhost:{a}"]
        # The exception covers that one endpoint only, not the host's other ports.
        with pytest.raises(UnsafeAddress):
            await fetcher.fetch(f"http://127.0.0.1:{b}/img.png")
        assert len(srv.hosts) == 1
    finally:
        await fetcher.aclose()


async def test_redirects_are_rechecked_at_every_hop(server: tuple[ImageServer, int, int]) -> None:
    srv, a, b = server
    only_a = AddressPolicy(allowed_endpoints=frozenset({("127.0.0.1", a)}))
    fetcher = ImageFetcher(policy=only_a)
    try:
        for target in (f"http://127.0.0.1:{b}/img.png", f"http://localhost:{b}/img.png"):
            with pytest.raises(UnsafeAddress):
                await fetcher.fetch(f"http://127.0.0.1:{a}/redirect?to={target}")
        assert srv.hosts == []  # the second hop was never requested
    finally:
        await fetcher.aclose()

    both = AddressPolicy(allowed_endpoints=frozenset({("127.0.0.1", a), ("127.0.0.1", b)}))
    fetcher = ImageFetcher(policy=both, limits=FetchLimits(max_redirects=1))
    try:
        got = await fetcher.fetch(f"http://127.0.0.1:{a}/redirect?to=http://127.0.0.1:{b}/img.png")
        assert got.data == PNG and srv.hosts == [f"127.0.0.1:{b}"]
        relative = f"http://127.0.0.1:{a}/redirect?to=/img.png"
        assert (await fetcher.fetch(relative)).data == PNG
        loop = f"http://127.0.0.1:{a}/redirect?to=/redirect%3Fto%3D/img.png"
        with pytest.raises(FetchError) as err:
            await fetcher.fetch(loop)
        assert err.value.reason == "too_many_redirects"
    finally:
        await fetcher.aclose()


async def test_http_limits(server: tuple[ImageServer, int, int]) -> None:
    _, a, _ = server
    fetcher = ImageFetcher(
        policy=AddressPolicy(allow_private=True), limits=FetchLimits(max_bytes=1024 * 1024)
    )
    base = f"http://127.0.0.1:{a}"
    try:
        for path, reason in [
            ("/text", "bad_type"),
            ("/mismatch", "bad_type"),
            ("/wide.png", "too_many_pixels"),
            ("/big", "too_large"),
            ("/missing", "http_status"),
        ]:
            with pytest.raises(FetchError) as err:
                await fetcher.fetch(base + path)
            assert err.value.reason == reason, path
        assert (await fetcher.fetch(base + "/img.png")).data == PNG
    finally:
        await fetcher.aclose()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a cert")
async def test_https_keeps_the_name_for_sni_and_certificate_checks(tmp_path: Path) -> None:
    """Connecting to the pinned IP must still verify the certificate against the URL's name."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(
        subprocess.run,
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    srv = ImageServer()
    async with serve(srv.app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as (port,):
        client = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=str(cert)), trust_env=False
        )
        policy = AddressPolicy(allowed_endpoints=frozenset({("127.0.0.1", port)}))
        fetcher = ImageFetcher(policy=policy, client=client)
        try:
            got = await fetcher.fetch(f"https://localhost:{port}/img.png")
            assert got.data == PNG and srv.hosts == [f"localhost:{port}"]
            # Same server by IP: the certificate does not name 127.0.0.1, so TLS refuses it.
            with pytest.raises(FetchError) as err:
                await fetcher.fetch(f"https://127.0.0.1:{port}/img.png")
            assert err.value.reason == "unreachable"
            assert isinstance(err.value.__cause__, httpx.ConnectError)
        finally:
            await client.aclose()
