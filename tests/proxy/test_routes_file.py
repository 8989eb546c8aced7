"""The routes file: what it accepts, what it refuses (naming the route and the field), and the
price rule's arithmetic. Pure: no chain, no server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import BadRequest
from gateway.proxy_routes import ProxyRoute, load_routes, parse_routes
from gateway.settings import SettingsError
from payments import BASE

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "proxy-routes.toml"
PAY_TO = "0x" + "11" * 20


def route(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "method": "POST",
        "path": "/v1/x",
        "description": "x",
        "price": "0.01",
    }
    return {**base, **fields}


def bound(**fields: Any) -> ProxyRoute:
    (spec,) = parse_routes({"route": [route(**fields)]})
    return ProxyRoute(spec, network=BASE, pay_to=PAY_TO, max_timeout_seconds=60)


def test_the_shipped_example_loads_and_prices_its_examples() -> None:
    specs = load_routes(EXAMPLE)
    assert [(s.method, s.path) for s in specs] == [
        ("POST", "/v1/completions"),
        ("GET", "/v1/reports/{id}"),
    ]
    completions = ProxyRoute(specs[0], network=BASE, pay_to=PAY_TO, max_timeout_seconds=60)
    assert completions.quote_now(json.dumps(specs[0].input_example).encode()).amount == (
        2000 + 64 * 20
    )
    assert completions.quote_now(b'{"prompt": "hi"}').amount == 2000 + 256 * 20  # default
    assert specs[1].matches("/v1/reports/7") and not specs[1].matches("/v1/reports/7/x")


def test_price_rule_is_exact_integer_arithmetic() -> None:
    r = bound(
        price="0.000001",
        price_per=[
            {"field": "a.n", "unit_price": "0.1", "max": 10},
            {"field": "m", "unit_price": "0.000003", "min": 2, "default": 2},
        ],
    )
    assert r.quote_now(b'{"a": {"n": 3}}').amount == 1 + 300_000 + 6
    assert r.quote_now(b'{"a": {"n": 0}, "m": 5}').amount == 1 + 15
    with pytest.raises(BadRequest) as info:
        r.quote_now(b'{"a": {"n": true}, "m": 1}')
    assert {e["field"] for e in info.value.errors} == {"a.n", "m"}
    with pytest.raises(BadRequest) as info:
        r.quote_now(b"{}")
    assert info.value.errors == [{"field": "a.n", "message": "required (it sets the price)"}]


def test_body_errors_name_the_fields() -> None:
    r = bound(
        input_schema={
            "type": "object",
            "required": ["prompt"],
            "additionalProperties": False,
            "properties": {"prompt": {"type": "string"}, "n": {"type": "integer"}},
        }
    )
    with pytest.raises(BadRequest) as info:
        r.quote_now(b'{"n": "x", "extra": 1}')
    fields = {e["field"]: e["message"] for e in info.value.errors}
    assert fields["prompt"] == "required"
    assert fields["extra"] == "unsupported option"
    assert "n" in fields
    for bad in (b"", b"[", b"\xff", b"[" * 100 + b"]" * 100):
        with pytest.raises(BadRequest) as info:
            r.quote_now(bad)
        assert info.value.reason == "invalid_json"


def test_schemas_can_come_from_json_files(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text(json.dumps({"type": "object", "required": ["q"]}))
    (tmp_path / "routes.toml").write_text(
        '[[route]]\nmethod = "post"\npath = "/q"\ndescription = "q"\nprice = "1"\n'
        'input_schema = "in.json"\ninput_example = { q = 1 }\n'
    )
    (spec,) = load_routes(tmp_path / "routes.toml")
    assert spec.method == "POST" and spec.input_schema == {"type": "object", "required": ["q"]}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (route(price=0.01), "field 'price': a USDC amount as a decimal string"),
        (route(price="0.0000001"), "field 'price': amount '0.0000001' has more than 6"),
        (route(price="0"), "field 'price': the cheapest request must cost more than 0"),
        (route(method="TRACE"), "route 1 (TRACE /v1/x), field 'method'"),
        (route(path="v1/x"), "field 'path': an absolute URL path"),
        (route(path="/v1/{a}x"), "field 'path': a parameter must be a whole segment"),
        (route(path="/healthz"), "field 'path': served by the gateway itself"),
        (route(description=""), "field 'description': required"),
        (route(colour="red"), "unknown field(s) ['colour']"),
        (route(input_schema={"type": "nope"}), "field 'input_schema': not a valid JSON Schema"),
        (route(input_schema="missing.json"), "field 'input_schema': cannot read"),
        (
            route(input_schema={"type": "object", "required": ["q"]}, input_example={}),
            "field 'input_example': does not match input_schema",
        ),
        (
            route(price_per=[{"field": "n", "unit_price": "0.01", "max": 3}], input_example={}),
            "field 'input_example': cannot be priced: n: required",
        ),
        (
            route(price_per=[{"field": "n", "unit_price": "0.01", "min": 5, "max": 3}]),
            "price_per 1, field 'max': must be at least min",
        ),
        (
            route(price_per=[{"field": "n", "unit_price": "0.01", "default": 9, "max": 3}]),
            "price_per 1, field 'default': must lie within min..max",
        ),
        (
            route(price_per=[{"field": "n", "unit_price": "0"}]),
            "price_per 1, field 'unit_price': must be more than 0",
        ),
        (
            route(method="GET", price_per=[{"field": "n", "unit_price": "0.01"}]),
            "field 'price_per': GET routes take no body",
        ),
    ],
)
def test_a_bad_routes_file_names_the_route_and_the_field(
    entry: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SettingsError) as info:
        parse_routes({"route": [entry]}, origin="routes.toml")
    message = str(info.value)
    assert message.startswith("routes.toml: route 1"), message
    assert expected in message, message


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no \\[\\[route\\]\\] tables"):
        parse_routes({})
    with pytest.raises(SettingsError, match="priced twice"):
        parse_routes({"route": [route(), route()]})
    bad = tmp_path / "bad.toml"
    bad.write_text("[[route]\n")
    with pytest.raises(SettingsError, match=r"bad\.toml"):
        load_routes(bad)
    with pytest.raises(SettingsError, match="cannot read routes file"):
        load_routes(tmp_path / "absent.toml")


def test_serve_refuses_a_bad_routes_file_before_binding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.cli import main

    monkeypatch.chdir(tmp_path)  # no stray .env
    bad = tmp_path / "routes.toml"
    bad.write_text('[[route]]\nmethod = "POST"\npath = "/x"\ndescription = "x"\nprice = "free"\n')
    assert main(["serve", "--upstream", "http://127.0.0.1:9", "--routes", str(bad)]) == 2
    assert "route 1 (POST /x), field 'price'" in capsys.readouterr().err
    assert main(["serve", "--routes", str(bad)]) == 2
    assert "need --upstream" in capsys.readouterr().err
