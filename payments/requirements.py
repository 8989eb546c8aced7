"""What the gateway asks to be paid (`Requirement`) and the 402 challenge built from it.

`build_payment_required` returns BOTH forms at once so every client generation can pay:
the v2 `PAYMENT-REQUIRED` header value (base64 JSON) and the v1 JSON response body (bytes,
ready to send). It is the hot path of every unpaid request, so results are memoised per
(offered requirements, error): the same body gives the same quote gives the same bytes.

Discovery metadata (`Discovery`) is published twice, in the shape each protocol version uses:
- v1: `accepts[].outputSchema = {input: {type: "http", method, discoverable, bodyType,
  bodyFields | queryParams}, output: <output schema or example>}`;
- v2: `extensions.bazaar = {info: {input: {type: "http", method, bodyType, body} |
  {type: "http", method, queryParams}, output: {type: "json", example}}, schema: <JSON Schema
  draft 2020-12 of info>}` (x402 `specs/extensions/bazaar.md`). `input_example` should validate
  against `input_schema`: facilitators validate `info` against `schema` before cataloguing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, NamedTuple

from .amounts import UINT256_MAX
from .eip3009 import TokenDomain, normalize_address
from .networks import Network
from .wire import b64_json, dumps_compact

__all__ = ["Challenge", "Discovery", "Requirement", "build_payment_required"]

_BODY_METHODS: Final = ("POST", "PUT", "PATCH")
_QUERY_METHODS: Final = ("GET", "HEAD", "DELETE")
_BODY_TYPES: Final = ("json", "form-data", "text")
_JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def _frozen_copy(value: Any) -> Any:
    """A private deep copy via JSON, so later mutation by the caller cannot change a quote."""
    return json.loads(dumps_compact(value))


@dataclass(frozen=True, kw_only=True, eq=False)
class Discovery:
    """How to call the paid resource (request body schema/example) and what it returns.

    The mappings are deep-copied on construction (a caller mutating its dicts later cannot
    change a published quote). Equality and hash are by content, so a `Requirement` holding
    one stays hashable (the challenge cache is keyed by requirements).
    """

    input_schema: Mapping[str, Any]
    input_example: Mapping[str, Any] | None = None
    output_schema: Mapping[str, Any] | None = None
    output_example: Any = None
    method: str = "POST"
    body_type: str = "json"
    _key: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in _BODY_METHODS + _QUERY_METHODS:
            raise ValueError(f"unsupported HTTP method {self.method!r}")
        if self.body_type not in _BODY_TYPES:
            raise ValueError(f"body_type must be one of {_BODY_TYPES}")
        for name in ("input_schema", "input_example", "output_schema", "output_example"):
            object.__setattr__(self, name, _frozen_copy(getattr(self, name)))
        key = json.dumps(
            [
                self.method,
                self.body_type,
                self.input_schema,
                self.input_example,
                self.output_schema,
                self.output_example,
            ],
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
        )
        object.__setattr__(self, "_key", key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Discovery) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    @property
    def _has_body(self) -> bool:
        return self.method in _BODY_METHODS

    def v1_output_schema(self) -> dict[str, Any]:
        """The v1 `outputSchema` object."""
        schema = _frozen_copy(self.input_schema)
        properties: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        shape: dict[str, Any] = {"type": "http", "method": self.method, "discoverable": True}
        if self._has_body:
            shape["bodyType"] = self.body_type
            shape["bodyFields"] = {
                name: {**prop, "required": name in required} for name, prop in properties.items()
            }
        else:
            shape["queryParams"] = {
                name: str(prop.get("description") or prop.get("type") or "string")
                for name, prop in properties.items()
            }
        out: dict[str, Any] = {"input": shape}
        output = self.output_schema if self.output_schema is not None else self.output_example
        if output is not None:
            out["output"] = _frozen_copy(output)
        return out

    def bazaar_extension(self) -> dict[str, Any]:
        """The v2 `extensions.bazaar` object: `{info, schema}`."""
        info_input: dict[str, Any] = {"type": "http", "method": self.method}
        input_props: dict[str, Any] = {
            "type": {"type": "string", "const": "http"},
            "method": {
                "type": "string",
                "enum": list(_BODY_METHODS if self._has_body else _QUERY_METHODS),
            },
        }
        example = _frozen_copy(self.input_example) if self.input_example is not None else {}
        if self._has_body:
            info_input["bodyType"] = self.body_type
            info_input["body"] = example
            input_props["bodyType"] = {"type": "string", "enum": list(_BODY_TYPES)}
            input_props["body"] = _frozen_copy(self.input_schema)
            required = ["type", "method", "bodyType", "body"]
        else:
            info_input["queryParams"] = example
            input_props["queryParams"] = _frozen_copy(self.input_schema)
            required = ["type", "method"]
        info: dict[str, Any] = {"input": info_input}
        properties: dict[str, Any] = {
            "input": {
                "type": "object",
                "properties": input_props,
                "required": required,
                "additionalProperties": False,
            }
        }
        if self.output_example is not None or self.output_schema is not None:
            info["output"] = {"type": "json"}
            if self.output_example is not None:
                info["output"]["example"] = _frozen_copy(self.output_example)
            properties["output"] = {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "example": _frozen_copy(self.output_schema or {}),
                },
                "required": ["type"],
            }
        return {
            "info": info,
            "schema": {
                "$schema": _JSON_SCHEMA_DIALECT,
                "type": "object",
                "properties": properties,
                "required": ["input"],
            },
        }


@dataclass(frozen=True, kw_only=True)
class Requirement:
    """One way to pay for one request: exact `amount` atomic units of `asset` to `pay_to`.

    `asset`, `token_name`, `token_version` default to the network's USDC and its EIP-712
    domain; addresses are stored checksummed. Hashable (the challenge cache relies on it).
    """

    network: Network
    amount: int
    pay_to: str
    resource_url: str
    description: str = ""
    mime_type: str = "application/json"
    max_timeout_seconds: int = 60
    asset: str = ""
    scheme: str = "exact"
    token_name: str = ""
    token_version: str = ""
    discovery: Discovery | None = None
    domain: TokenDomain = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int):
            raise TypeError("amount must be an int of atomic units")
        if not 0 < self.amount <= UINT256_MAX:
            raise ValueError("amount must be positive and fit in uint256")
        if isinstance(self.max_timeout_seconds, bool) or self.max_timeout_seconds <= 0:
            raise ValueError("max_timeout_seconds must be a positive int")
        if not self.resource_url:
            raise ValueError("resource_url is required")
        set_ = object.__setattr__
        set_(self, "pay_to", normalize_address(self.pay_to))
        set_(self, "asset", normalize_address(self.asset or self.network.usdc))
        set_(self, "token_name", self.token_name or self.network.token_name)
        set_(self, "token_version", self.token_version or self.network.token_version)
        set_(
            self,
            "domain",
            TokenDomain(self.token_name, self.token_version, self.network.chain_id, self.asset),
        )

    @property
    def extra(self) -> dict[str, str]:
        """`extra` of the exact EVM scheme: the token's EIP-712 name and version."""
        return {"name": self.token_name, "version": self.token_version}

    def v2_dict(self) -> dict[str, Any]:
        """This requirement as a v2 `accepts[]` entry."""
        return {
            "scheme": self.scheme,
            "network": self.network.caip2,
            "amount": str(self.amount),
            "asset": self.asset,
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "extra": self.extra,
        }

    def v1_dict(self) -> dict[str, Any]:
        """This requirement as a v1 `accepts[]` entry."""
        entry: dict[str, Any] = {
            "scheme": self.scheme,
            "network": self.network.name,
            "maxAmountRequired": str(self.amount),
            "resource": self.resource_url,
            "description": self.description,
            "mimeType": self.mime_type,
        }
        if self.discovery is not None:
            entry["outputSchema"] = self.discovery.v1_output_schema()
        entry.update(
            payTo=self.pay_to,
            maxTimeoutSeconds=self.max_timeout_seconds,
            asset=self.asset,
            extra=self.extra,
        )
        return entry


class Challenge(NamedTuple):
    """A ready-to-send 402: v2 header value and v1 JSON body bytes."""

    header: str
    body: bytes

    def body_json(self) -> dict[str, Any]:
        """The v1 body parsed back (tests, logging)."""
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


def build_payment_required(
    offered: Sequence[Requirement], error: str = "Payment required"
) -> Challenge:
    """Both 402 forms for `offered` (memoised). All entries must share one resource."""
    return _build(tuple(offered), error)


@lru_cache(maxsize=4096)
def _build(offered: tuple[Requirement, ...], error: str) -> Challenge:
    if not offered:
        raise ValueError("at least one requirement must be offered")
    first = offered[0]
    for req in offered[1:]:
        if (req.resource_url, req.description, req.mime_type, req.discovery) != (
            first.resource_url,
            first.description,
            first.mime_type,
            first.discovery,
        ):
            raise ValueError("all offered requirements must describe the same resource")
    v2 = {
        "x402Version": 2,
        "error": error,
        "resource": {
            "url": first.resource_url,
            "description": first.description,
            "mimeType": first.mime_type,
        },
        "accepts": [req.v2_dict() for req in offered],
        "extensions": (
            {"bazaar": first.discovery.bazaar_extension()} if first.discovery is not None else {}
        ),
    }
    v1 = {"x402Version": 1, "error": error, "accepts": [req.v1_dict() for req in offered]}
    return Challenge(header=b64_json(v2), body=dumps_compact(v1).encode("utf-8"))
