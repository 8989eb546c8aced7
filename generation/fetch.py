"""Fetching the optional `image` input: an http(s) URL or a `data:` URL, checked before use.

Limits apply to bytes on the wire (checked while streaming, not after), the declared type, the
decoded format and the pixel dimensions (read from the header before any full decode, so a
decompression bomb is refused cheaply). URL fetches go through `generation.netguard`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import httpx
from PIL import Image, UnidentifiedImageError

from generation.errors import FetchError
from generation.netguard import AddressPolicy, guarded_client, resolve_target, send_pinned

__all__ = ["FetchLimits", "FetchedImage", "ImageFetcher"]

_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_width: int = 4096
    max_height: int = 4096
    content_types: frozenset[str] = frozenset(_FORMATS)
    timeout: float = 15.0
    max_redirects: int = 3


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    content_type: str
    width: int
    height: int


class ImageFetcher:
    """Owns (or borrows) one guarded HTTP client; see `netguard.guarded_client`."""

    def __init__(
        self,
        *,
        policy: AddressPolicy | None = None,
        limits: FetchLimits | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._policy = policy or AddressPolicy()
        self._limits = limits or FetchLimits()
        self._own_client = client is None
        self._client = client or guarded_client(self._limits.timeout)

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def fetch(self, source: str) -> FetchedImage:
        if source[:5].lower() == "data:":
            content_type, data = self._parse_data_url(source)
        else:
            try:
                async with asyncio.timeout(self._limits.timeout):
                    content_type, data = await self._download(source)
            except TimeoutError as exc:
                raise FetchError("timeout", "image download timed out") from exc
        width, height = await asyncio.to_thread(self._inspect, data, content_type)
        return FetchedImage(data=data, content_type=content_type, width=width, height=height)

    def _parse_data_url(self, source: str) -> tuple[str, bytes]:
        header, sep, payload = source[5:].partition(",")
        if not sep:
            raise FetchError("bad_data_url", "data URL has no comma")
        params = [p.strip().lower() for p in header.split(";")]
        if "base64" not in params[1:]:
            raise FetchError("bad_data_url", "image data URLs must be base64")
        content_type = self._check_type(params[0])
        # Reject on the encoded length first: never decode more than the limit allows.
        if len(payload) > (self._limits.max_bytes * 4) // 3 + 4:
            raise FetchError("too_large", f"image exceeds {self._limits.max_bytes} bytes")
        try:
            data = base64.b64decode(unquote_to_bytes(payload), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FetchError("bad_data_url", "data URL is not valid base64") from exc
        if len(data) > self._limits.max_bytes:
            raise FetchError("too_large", f"image exceeds {self._limits.max_bytes} bytes")
        return content_type, data

    async def _download(self, url: str) -> tuple[str, bytes]:
        current = url
        for _hop in range(self._limits.max_redirects + 1):
            target = await resolve_target(current, self._policy)
            try:
                response = await send_pinned(
                    self._client, "GET", target, headers={"Accept": "image/*"}, stream=True
                )
            except httpx.HTTPError as exc:
                raise FetchError("unreachable", "image URL could not be reached") from exc
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError("bad_redirect", "redirect without a location")
                    # Resolve relative to the URL as given, not the pinned address.
                    current = str(target.url.join(location))
                    continue
                if response.status_code != 200:
                    raise FetchError("http_status", f"image URL answered {response.status_code}")
                content_type = self._check_type(response.headers.get("content-type", ""))
                return content_type, await self._read_limited(response)
            finally:
                await response.aclose()
        raise FetchError("too_many_redirects", "image URL redirects too often")

    async def _read_limited(self, response: httpx.Response) -> bytes:
        limit = self._limits.max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise FetchError("too_large", f"image exceeds {limit} bytes")
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise FetchError("too_large", f"image exceeds {limit} bytes")
        except httpx.HTTPError as exc:
            raise FetchError("unreachable", "image download failed") from exc
        return bytes(body)

    def _check_type(self, header: str) -> str:
        content_type = header.split(";", 1)[0].strip().lower()
        if content_type not in self._limits.content_types or content_type not in _FORMATS:
            raise FetchError("bad_type", f"image type {content_type or 'unknown'!r} not accepted")
        return content_type

    def _inspect(self, data: bytes, content_type: str) -> tuple[int, int]:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != _FORMATS[content_type]:
                    raise FetchError("bad_type", f"content is {img.format}, not {content_type}")
                width, height = img.size
                if width > self._limits.max_width or height > self._limits.max_height:
                    raise FetchError(
                        "too_many_pixels",
                        f"image is {width}x{height}; limit"
                        f" {self._limits.max_width}x{self._limits.max_height}",
                    )
                img.load()
        except FetchError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise FetchError("undecodable", "image could not be decoded") from exc
        return width, height
