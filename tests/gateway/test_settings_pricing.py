"""Pure tests: settings safety rules and the price book."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from gateway.pricing import PricingError, load_price_book
from gateway.settings import Settings, SettingsError

ANVIL_KEY_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
FRESH_KEY = "0x" + "11" * 32


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_well_known_dev_keys_are_refused_outside_dev_mode() -> None:
    with pytest.raises(SettingsError, match="well-known"):
        settings(settler_key=SecretStr(ANVIL_KEY_0)).load_settler_key()
    assert (
        settings(settler_key=SecretStr(ANVIL_KEY_0), mode="dev").load_settler_key() == ANVIL_KEY_0
    )
    assert settings(settler_key=SecretStr(FRESH_KEY)).load_settler_key() == FRESH_KEY


def test_key_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "settler.key"
    path.write_text(FRESH_KEY + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(SettingsError, match="chmod 600"):
        settings(settler_key_file=path).load_settler_key()
    os.chmod(path, 0o600)
    assert settings(settler_key_file=path).load_settler_key() == FRESH_KEY


def test_bad_or_missing_keys_say_so_without_echoing_them() -> None:
    with pytest.raises(SettingsError, match="no settler key"):
        settings().load_settler_key()
    with pytest.raises(SettingsError) as info:
        settings(settler_key=SecretStr("0xnot-a-key")).load_settler_key()
    assert "not-a-key" not in str(info.value)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X402_RPC_URL", "http://rpc.example:8545")
    monkeypatch.setenv("X402_MAX_TIMEOUT_SECONDS", "90")
    s = settings()
    assert (s.rpc_url, s.max_timeout_seconds) == ("http://rpc.example:8545", 90)
    assert "11" * 32 not in repr(settings(settler_key=SecretStr(FRESH_KEY)))


def test_fault_injection_is_dev_only() -> None:
    with pytest.raises(ValidationError):
        settings(fault_injection=True)
    assert settings(fault_injection=True, mode="dev").fault_injection


def test_shipped_price_book_is_exact_and_under_the_default_client_cap() -> None:
    book = load_price_book()
    default = book.get(None)
    assert default is not None and default.model == book.default_model
    four = default.quote(4, has_image=False)
    assert four == 130_000  # 0.05 + 4 x 0.02 USDC, in atomic units
    assert four <= 1_000_000
    assert default.quote(4, has_image=True) == four + default.image_surcharge
    assert book.get("no-such-model") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models.a]\nbase = "0.0000001"', "models.a"),  # more precise than USDC's 6 decimals
        ('[models.a]\nbase = "-1"', "models.a"),
        ('[models.a]\nper_second = "1"', "missing 'base'"),
        ('[models.a]\nbase = "1"\nbackend = "gpu"', "backend"),
        ('[models.a]\nbase = "1"\nmin_duration = 5\nmax_duration = 2', "min_duration"),
        ('default_model = "b"\n[models.a]\nbase = "1"', "default_model"),
        ("nonsense = [", "pricing"),
    ],
)
def test_malformed_price_books_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pricing.toml"
    path.write_text(text)
    with pytest.raises(PricingError, match=message):
        load_price_book(path)


def test_allowed_url_endpoints_are_ip_port_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X402_ALLOWED_URL_ENDPOINTS", '["10.0.0.7:8080", "[::1]:9000"]')
    assert settings().url_endpoints() == {("10.0.0.7", 8080), ("::1", 9000)}
    with pytest.raises(ValidationError):
        settings(allowed_url_endpoints=("hooks.internal:80",))
