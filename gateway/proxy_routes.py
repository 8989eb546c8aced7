"""Proxy mode's priced routes: a TOML file of `[[route]]` tables, each a `PricedRoute`.

The price rule is deliberately small, so a payer can compute it from the discovery document:

    amount = price + sum(unit_price * body[field] for each [[route.price_per]] term)

`price` and `unit_price` are USDC decimal strings ("0.01"), parsed once into atomic units.
`field` is a dotted path to an integer in the JSON body (`options.max_tokens`); `min`/`max`
bound it (a body outside them is refused with 400 before any 402) and `default` is used when
the field is absent (no default: the field is required). Bodies are validated against
`input_schema` (JSON Schema draft 2020-12) first; what fails is a 400 with field errors.

Routes with GET/HEAD/DELETE take no body: their price is `price` alone and `input_schema`
only documents the query parameters in discovery. `path` is exact or has whole `{name}`
segments (`/v1/items/{id}`); an exact path wins over a template.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jsonschema

from gateway.errors import BadRequest
from gateway.middleware import Quote
from gateway.settings import SettingsError
from payments import Discovery, Network, Requirement
from payments.amounts import UINT256_MAX, format_usdc, parse_usdc
from payments.errors import InvalidAmount
from payments.wire import json_nesting_exceeds

__all__ = [
    "RESERVED_PATHS",
    "PriceRule",
    "PriceTerm",
    "ProxyRoute",
    "RouteSpec",
    "load_routes",
    "parse_routes",
]

BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
QUERY_METHODS: Final = frozenset({"GET", "HEAD", "DELETE"})
# Served by the gateway itself; a route file may not shadow them.
RESERVED_PATHS: Final = frozenset(
    {"/healthz", "/.well-known/x402", "/.well-known/x402.schema.json"}
)

_MAX_JSON_DEPTH: Final = 32
_MAX_FIELD_ERRORS: Final = 20
_CACHEABLE_BODY_BYTES: Final = 4096
_CACHE_ENTRIES: Final = 1024
_SEGMENT_PARAM: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PATH_CHARS: Final = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/{}-]*")
_ROUTE_KEYS: Final = frozenset(
    {
        "method",
        "path",
        "description",
        "mime_type",
        "price",
        "price_per",
        "input_schema",
        "output_schema",
        "input_example",
        "output_example",
    }
)
_TERM_KEYS: Final = frozenset({"field", "unit_price", "min", "max", "default"})


@dataclass(frozen=True)
class PriceTerm:
    """`unit_price` atomic units per unit of the integer body field `field` (dotted path)."""

    field: str
    unit_price: int
    min: int = 0
    max: int | None = None
    default: int | None = None

    def value_in(self, body: Any) -> tuple[int | None, str | None]:
        """The field's value (or default), or an error message for a 400."""
        value: Any = body
        for part in self.field.split("."):
            if not isinstance(value, dict) or part not in value:
                if self.default is None:
                    return None, "required (it sets the price)"
                return self.default, None
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, int):
            return None, "must be an integer"
        if value < self.min:
            return None, f"must be at least {self.min}"
        if self.max is not None and value > self.max:
            return None, f"must be at most {self.max}"
        return value, None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "field": self.field,
            "unitPrice": format_usdc(self.unit_price),
            "unitPriceAtomic": str(self.unit_price),
            "min": self.min,
        }
        if self.max is not None:
            out["max"] = self.max
        if self.default is not None:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class PriceRule:
    fixed: int
    terms: tuple[PriceTerm, ...] = ()

    def quote(self, body: Any) -> int:
        """The amount for a schema-valid body; `BadRequest` naming each bad pricing field."""
        amount = self.fixed
        errors: list[dict[str, str]] = []
        for term in self.terms:
            value, problem = term.value_in(body)
            if problem is not None:
                errors.append({"field": term.field, "message": problem})
            elif value is not None:
                amount += term.unit_price * value
        if errors:
            raise BadRequest("invalid request body", errors=errors)
        if amount <= 0:
            raise BadRequest("this request prices at zero; nothing to pay", reason="zero_price")
        if amount > UINT256_MAX:
            raise BadRequest("this request prices above uint256", reason="price_too_large")
        return amount

    def describe(self) -> dict[str, Any]:
        """The rule as discovery publishes it (money as decimal strings and atomic units)."""
        formula = format_usdc(self.fixed)
        for term in self.terms:
            formula += f" + {format_usdc(term.unit_price)} * {term.field}"
        return {
            "currency": "USDC",
            "decimals": 6,
            "formula": formula,
            "fixed": format_usdc(self.fixed),
            "fixedAtomic": str(self.fixed),
            "perField": [term.describe() for term in self.terms],
        }


@dataclass(frozen=True, eq=False)
class RouteSpec:
    """One `[[route]]` of the file, parsed and checked (network-independent)."""

    method: str
    path: str
    description: str
    mime_type: str
    rule: PriceRule
    input_schema: Mapping[str, Any]
    input_example: Mapping[str, Any] | None = None
    output_schema: Mapping[str, Any] | None = None
    output_example: Any = None
    pattern: re.Pattern[str] | None = field(default=None, repr=False)

    @property
    def has_body(self) -> bool:
        return self.method in BODY_METHODS

    def matches(self, path: str) -> bool:
        if self.pattern is None:
            return path == self.path
        return self.pattern.fullmatch(path) is not None


class ProxyRoute:
    """A `PricedRoute` for one spec, bound to the network and payee of this gateway."""

    def __init__(
        self,
        spec: RouteSpec,
        *,
        network: Network,
        pay_to: str,
        max_timeout_seconds: int,
        path: str | None = None,
    ) -> None:
        self.spec = spec
        self.method = spec.method
        self.path = path or spec.path
        self.description = spec.description
        self.mime_type = spec.mime_type
        self.network = network
        self.pay_to = pay_to
        self.max_timeout_seconds = max_timeout_seconds
        self.discovery = Discovery(
            input_schema=spec.input_schema,
            input_example=spec.input_example,
            output_schema=spec.output_schema,
            output_example=spec.output_example,
            method=spec.method,
        )
        self._validator = jsonschema.Draft202012Validator(dict(spec.input_schema))
        self._quotes: OrderedDict[bytes, Quote] = OrderedDict()
        self._offers: OrderedDict[tuple[int, str], tuple[Requirement, ...]] = OrderedDict()

    def at(self, path: str) -> ProxyRoute:
        """This templated route for one concrete path (shares the caches)."""
        bound = ProxyRoute.__new__(ProxyRoute)
        bound.__dict__.update(self.__dict__)
        bound.path = path
        return bound

    async def quote(self, body: bytes) -> Quote:
        # Same body, same quote: a paid retry repeats the body of its 402.
        cached = self._quotes.get(body)
        if cached is not None:
            self._quotes.move_to_end(body)
            return cached
        quote = self.quote_now(body)
        if len(body) <= _CACHEABLE_BODY_BYTES:
            _remember(self._quotes, body, quote)
        return quote

    def quote_now(self, body: bytes) -> Quote:
        if not self.spec.has_body:
            return Quote(amount=self.spec.rule.quote({}), request=None)
        parsed = self._parse(body)
        errors = sorted(
            self._validator.iter_errors(parsed), key=lambda e: [str(p) for p in e.absolute_path]
        )
        if errors:
            problems = [problem for err in errors for problem in _field_errors(err)]
            raise BadRequest("invalid request body", errors=problems[:_MAX_FIELD_ERRORS])
        return Quote(amount=self.spec.rule.quote(parsed), request=parsed)

    @staticmethod
    def _parse(body: bytes) -> Any:
        if json_nesting_exceeds(body, _MAX_JSON_DEPTH):
            raise BadRequest("request body is nested too deeply", reason="invalid_json")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise BadRequest("request body must be JSON", reason="invalid_json") from exc

    def requirements(self, quote: Quote, resource_url: str) -> Sequence[Requirement]:
        key = (quote.amount, resource_url)
        offered = self._offers.get(key)
        if offered is None:
            offered = (
                Requirement(
                    network=self.network,
                    amount=quote.amount,
                    asset=self.network.usdc,
                    pay_to=self.pay_to,
                    max_timeout_seconds=self.max_timeout_seconds,
                    resource_url=resource_url,
                    description=self.description,
                    mime_type=self.mime_type,
                    discovery=self.discovery,
                ),
            )
            _remember(self._offers, key, offered)
        return offered

    def price_rule(self) -> dict[str, Any]:
        return self.spec.rule.describe()


def _field_errors(err: Any) -> list[dict[str, str]]:
    """`{field, message}` for a schema error, naming the property a client must fix."""
    where = [str(p) for p in err.absolute_path]
    instance = err.instance
    if err.validator == "required" and isinstance(instance, dict):
        # one error per missing property; its message starts with the property's repr
        for name in err.validator_value:
            if (
                isinstance(name, str)
                and name not in instance
                and err.message.startswith(repr(name))
            ):
                return [{"field": ".".join([*where, name]), "message": "required"}]
    if err.validator == "additionalProperties" and isinstance(instance, dict):
        known = set((err.schema or {}).get("properties") or {})
        extra = sorted(k for k in instance if k not in known)
        if extra and not (err.schema or {}).get("patternProperties"):
            return [
                {"field": ".".join([*where, k]), "message": "unsupported option"} for k in extra
            ]
    return [{"field": ".".join(where) or "body", "message": _short(err.message)}]


def _short(message: str, limit: int = 200) -> str:
    # jsonschema messages quote the offending value; keep a huge value from echoing back
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    if len(cache) > _CACHE_ENTRIES:
        cache.popitem(last=False)


# -- loading -----------------------------------------------------------------------------------


def load_routes(path: Path) -> list[RouteSpec]:
    """Read and check a routes file; `SettingsError` names the route and the field."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read routes file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: {exc}") from exc
    return parse_routes(data, origin=str(path), base_dir=path.parent)


def parse_routes(
    data: Mapping[str, Any], *, origin: str = "routes", base_dir: Path | None = None
) -> list[RouteSpec]:
    unknown = set(data) - {"route"}
    if unknown:
        raise SettingsError(f"{origin}: unknown top-level key(s) {sorted(unknown)}; use [[route]]")
    raw = data.get("route")
    if not isinstance(raw, list) or not raw:
        raise SettingsError(f"{origin}: no [[route]] tables")
    specs: list[RouteSpec] = []
    seen: set[tuple[str, str]] = set()
    for index, entry in enumerate(raw):
        spec = _parse_route(entry, f"{origin}: route {index + 1}", base_dir or Path("."))
        key = (spec.method, spec.path)
        if key in seen:
            raise SettingsError(f"{origin}: {spec.method} {spec.path} is priced twice")
        seen.add(key)
        specs.append(spec)
    return specs


class _Fields:
    """Typed reads of one TOML table, each failure naming the table and the key."""

    def __init__(self, table: Mapping[str, Any], where: str) -> None:
        self.table = table
        self.where = where

    def fail(self, key: str, message: str) -> SettingsError:
        return SettingsError(f"{self.where}, field {key!r}: {message}")

    def text(self, key: str, default: str | None = None) -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "required, a non-empty string")
        return value

    def usdc(self, key: str, default: str | None = None) -> int:
        value = self.table.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, 'a USDC amount as a decimal string, e.g. "0.01"')
        try:
            return parse_usdc(value)
        except InvalidAmount as exc:
            raise self.fail(key, str(exc)) from None

    def integer(self, key: str) -> int | None:
        value = self.table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "an integer")
        return value

    def json_value(self, key: str, base_dir: Path) -> Any:
        """An inline table, or a path (relative to the routes file) to a JSON file."""
        value = self.table.get(key)
        if value is None or isinstance(value, dict):
            return value
        if not isinstance(value, str):
            raise self.fail(key, "an inline table or the path of a JSON file")
        file = base_dir / value
        try:
            return json.loads(file.read_text("utf-8"))
        except OSError as exc:
            raise self.fail(key, f"cannot read {file}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self.fail(key, f"{file} is not JSON: {exc}") from None


def _parse_route(entry: Any, where: str, base_dir: Path) -> RouteSpec:
    if not isinstance(entry, dict):
        raise SettingsError(f"{where}: must be a table")
    f = _Fields(entry, where)
    method = f.text("method").upper()
    path = f.text("path")
    where = f"{where} ({method} {path})"
    f = _Fields(entry, where)
    unknown = set(entry) - _ROUTE_KEYS
    if unknown:
        raise SettingsError(f"{where}: unknown field(s) {sorted(unknown)}")
    if method not in BODY_METHODS | QUERY_METHODS:
        raise f.fail("method", f"one of {sorted(BODY_METHODS | QUERY_METHODS)}")
    pattern = _path_pattern(path, f)
    terms = tuple(
        _parse_term(t, f"{where}, price_per {i + 1}") for i, t in enumerate(_terms(entry, f))
    )
    if terms and method not in BODY_METHODS:
        raise f.fail("price_per", f"{method} routes take no body; use a fixed price")
    rule = PriceRule(fixed=f.usdc("price", "0"), terms=terms)
    if rule.fixed + sum(t.unit_price * t.min for t in terms) <= 0:
        raise f.fail("price", "the cheapest request must cost more than 0")

    input_schema = f.json_value("input_schema", base_dir)
    if input_schema is None:
        input_schema = {"type": "object"}
    elif not isinstance(input_schema, dict):
        raise f.fail("input_schema", "a JSON Schema object")
    try:
        jsonschema.Draft202012Validator.check_schema(input_schema)
    except jsonschema.SchemaError as exc:
        raise f.fail("input_schema", f"not a valid JSON Schema: {exc.message}") from None
    output_schema = f.json_value("output_schema", base_dir)
    if output_schema is not None:
        if not isinstance(output_schema, dict):
            raise f.fail("output_schema", "a JSON Schema object")
        try:
            jsonschema.Draft202012Validator.check_schema(output_schema)
        except jsonschema.SchemaError as exc:
            raise f.fail("output_schema", f"not a valid JSON Schema: {exc.message}") from None
    input_example = f.json_value("input_example", base_dir)
    output_example = f.json_value("output_example", base_dir)

    spec = RouteSpec(
        method=method,
        path=path,
        description=f.text("description"),
        mime_type=f.text("mime_type", "application/json"),
        rule=rule,
        input_schema=input_schema,
        input_example=input_example,
        output_schema=output_schema,
        output_example=output_example,
        pattern=pattern,
    )
    if input_example is not None:
        _check_example(spec, f)
    return spec


def _terms(entry: Mapping[str, Any], f: _Fields) -> Iterator[Any]:
    raw = entry.get("price_per", [])
    if not isinstance(raw, list):
        raise f.fail("price_per", "an array of tables ([[route.price_per]])")
    return iter(raw)


def _parse_term(entry: Any, where: str) -> PriceTerm:
    if not isinstance(entry, dict):
        raise SettingsError(f"{where}: must be a table")
    f = _Fields(entry, where)
    unknown = set(entry) - _TERM_KEYS
    if unknown:
        raise SettingsError(f"{where}: unknown field(s) {sorted(unknown)}")
    name = f.text("field")
    if not all(part.strip() for part in name.split(".")):
        raise f.fail("field", "a dotted path like 'options.max_tokens'")
    unit_price = f.usdc("unit_price")
    if unit_price <= 0:
        raise f.fail("unit_price", "must be more than 0")
    low = f.integer("min") or 0
    high = f.integer("max")
    default = f.integer("default")
    if low < 0:
        raise f.fail("min", "must be 0 or more (a price never goes down)")
    if high is not None and high < low:
        raise f.fail("max", "must be at least min")
    if default is not None and (default < low or (high is not None and default > high)):
        raise f.fail("default", "must lie within min..max")
    return PriceTerm(field=name, unit_price=unit_price, min=low, max=high, default=default)


def _path_pattern(path: str, f: _Fields) -> re.Pattern[str] | None:
    if not _PATH_CHARS.fullmatch(path) or "//" in path:
        raise f.fail("path", "an absolute URL path like /v1/items or /v1/items/{id}")
    if path in RESERVED_PATHS:
        raise f.fail("path", "served by the gateway itself")
    if "{" not in path and "}" not in path:
        return None
    parts = []
    names: set[str] = set()
    for segment in path.split("/"):
        match = _SEGMENT_PARAM.fullmatch(segment)
        if match is None:
            if "{" in segment or "}" in segment:
                raise f.fail("path", "a parameter must be a whole segment: /items/{id}")
            parts.append(re.escape(segment))
            continue
        if match.group(1) in names:
            raise f.fail("path", f"parameter {{{match.group(1)}}} appears twice")
        names.add(match.group(1))
        parts.append("[^/]+")
    return re.compile("/".join(parts))


def _check_example(spec: RouteSpec, f: _Fields) -> None:
    """The example is what discovery quotes: it must be a body this route accepts."""
    if not spec.has_body:
        return
    errors = list(
        jsonschema.Draft202012Validator(dict(spec.input_schema)).iter_errors(spec.input_example)
    )
    if errors:
        raise f.fail("input_example", f"does not match input_schema: {errors[0].message}")
    try:
        spec.rule.quote(spec.input_example)
    except BadRequest as exc:
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors) or exc.message
        raise f.fail("input_example", f"cannot be priced: {detail}") from None
