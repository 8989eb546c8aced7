"""The public URL of a resource, as a payer must see it (in the 402's ``resource``)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import Scope

from gateway.settings import Settings

__all__ = ["resource_url_builder"]


def resource_url_builder(settings: Settings) -> Callable[[Scope], str]:
    """The URL a payer sees for the resource: the configured public base, else the request's
    own origin (from X-Forwarded-Proto/Host when the proxy is trusted)."""

    def build(scope: Scope) -> str:
        path: str = scope["path"]
        if settings.public_base_url:
            return settings.public_base_url + path
        headers: dict[str, str] = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        scheme: str = scope.get("scheme", "http")
        host = headers.get("host")
        if settings.trust_forwarded_headers:
            scheme = headers.get("x-forwarded-proto", scheme).split(",")[0].strip()
            host = headers.get("x-forwarded-host", host or "").split(",")[0].strip() or host
        if not host:
            server = scope.get("server") or ("localhost", 80)
            host = f"{server[0]}:{server[1]}"
        return f"{scheme}://{host}{path}"

    return build
