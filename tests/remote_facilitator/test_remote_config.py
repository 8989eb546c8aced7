"""Pure parts of remote facilitator mode: which keys a gateway needs, the auth header, and the
request body (the same JSON the official SDK's facilitator client sends)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from pydantic import SecretStr
from x402.schemas import PaymentPayload, PaymentRequirements
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

from gateway.payment_services import resolve_payee
from gateway.settings import Settings, SettingsError
from payments.eip3009 import Authorization, sign_authorization
from payments.networks import BASE
from payments.remote_facilitator import parse_auth_header, request_body
from payments.requirements import Requirement
from payments.verify import Payment

PAY_TO = "0x00000000000000000000000000000000000000a1"
KEY = "0x" + "11" * 32


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(_env_file=None, database=tmp_path / "db", **values)


def test_remote_mode_needs_no_key_but_a_pay_to(tmp_path: Path) -> None:
    remote = {"facilitator_url": "http://127.0.0.1:9"}
    key, pay_to = resolve_payee(_settings(tmp_path, pay_to=PAY_TO, **remote))
    assert key is None and pay_to.lower() == PAY_TO
    with pytest.raises(SettingsError, match="X402_PAY_TO"):
        resolve_payee(_settings(tmp_path, **remote))
    # a key configured anyway is loaded (refunds work) and pays to its address by default
    key, pay_to = resolve_payee(_settings(tmp_path, settler_key=SecretStr(KEY), **remote))
    assert key == KEY and pay_to == Account.from_key(KEY).address


def test_own_settler_mode_still_needs_the_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no settler key"):
        resolve_payee(_settings(tmp_path, pay_to=PAY_TO))


def test_a_bad_auth_header_is_a_settings_error_that_hides_the_value(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        pay_to=PAY_TO,
        facilitator_url="http://127.0.0.1:9",
        facilitator_auth_header=SecretStr("Bearer s3cret-token"),
    )
    with pytest.raises(SettingsError) as error:
        resolve_payee(settings)
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Authorization: Bearer abc", ("Authorization", "Bearer abc")),
        ("X-Api-Key:k", ("X-Api-Key", "k")),
    ],
)
def test_auth_header_parses(text: str, parsed: tuple[str, str]) -> None:
    assert parse_auth_header(text) == parsed


@pytest.mark.parametrize("text", ["no colon", ": value", "Bad Name: v", "Name:", "A: b\r\nC: d"])
def test_auth_header_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="auth header"):
        parse_auth_header(text)


def _payment(version: int) -> Payment:
    account = Account.create()
    req = Requirement(
        network=BASE, amount=42_000, pay_to=PAY_TO, resource_url="http://127.0.0.1/paid"
    )
    auth = Authorization(
        from_=account.address,
        to=req.pay_to,
        value=42_000,
        valid_after=1,
        valid_before=2**40,
        nonce=bytes(range(32)),
    )
    return Payment(
        version=version,
        scheme="exact",
        network=BASE.caip2 if version == 2 else BASE.name,
        asset=req.asset,
        requirement=req,
        authorization=auth,
        signature=sign_authorization(bytes(account.key), req.domain, auth),
    )


@pytest.mark.parametrize("version", [2, 1])
def test_request_body_is_what_the_official_sdk_sends(version: int) -> None:
    body = request_body(_payment(version))
    assert set(body) == {"x402Version", "paymentPayload", "paymentRequirements"}
    assert body["x402Version"] == body["paymentPayload"]["x402Version"] == version
    models: tuple[Any, Any] = (
        (PaymentPayload, PaymentRequirements)
        if version == 2
        else (PaymentPayloadV1, PaymentRequirementsV1)
    )
    payload = models[0].model_validate(body["paymentPayload"])
    requirements = models[1].model_validate(body["paymentRequirements"])
    # the SDK client sends model_dump(by_alias=True, exclude_none=True) of these models
    assert (
        payload.model_dump(mode="json", by_alias=True, exclude_none=True)
        == (body["paymentPayload"])
    )
    assert (
        requirements.model_dump(mode="json", by_alias=True, exclude_none=True)
        == (body["paymentRequirements"])
    )
