"""Gateway settings: built once in `main()` (or by a test) and passed to `create_app`.

Nothing here is read at import time. Environment variables use the prefix `X402_` and a `.env`
file in the working directory is honoured, e.g. `X402_RPC_URL`, `X402_SETTLER_KEY_FILE`.
"""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path
from typing import Annotated, Literal

from eth_account import Account
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["WELL_KNOWN_DEV_ADDRESSES", "Settings", "SettingsError"]

# Addresses of the keys every Anvil/Hardhat node hands out (mnemonic "test test ... junk").
# Their private keys are public: a gateway settling real money with one would be drained.
WELL_KNOWN_DEV_ADDRESSES = frozenset(
    a.lower()
    for a in (
        "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
        "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
        "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
        "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
        "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65",
        "0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc",
        "0x976EA74026E726554dB657fA54763abd0C3a0aa9",
        "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955",
        "0x23618e81E3f5cdF7f54C3d65f7FBc0aBf5B21E8f",
        "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
    )
)


class SettingsError(ValueError):
    """The configuration cannot run a gateway safely; the message says what to change."""


PositiveInt = Annotated[int, Field(gt=0)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="X402_", env_file=".env", extra="ignore", frozen=True
    )

    # Chain and money.
    network: str = "base"
    rpc_url: str = "http://127.0.0.1:8545"
    asset: str | None = None  # token address override (a custom network)
    chain_id: int | None = None  # override, with `asset`, for any EVM chain
    token_name: str | None = None
    token_version: str | None = None
    pay_to: str | None = None  # defaults to the settler address (refunds are sent from it)
    settler_key: SecretStr | None = None
    settler_key_file: Path | None = None
    rpc_timeout_seconds: PositiveInt = 10
    max_timeout_seconds: PositiveInt = 120
    settle_margin_seconds: int = Field(default=6, ge=0)
    # While serving, payments left half-way (an answer lost on the way, a payer who never
    # retried, a refund that failed) are resolved from the chain every interval, once no
    # request has touched them for the idle time. 0 turns the sweep off (start-up still
    # reconciles).
    payment_sweep_interval_seconds: int = Field(default=60, ge=0)
    payment_sweep_idle_seconds: PositiveInt = 300

    # HTTP.
    public_base_url: str | None = None  # e.g. https://api.example.com behind a proxy
    trust_forwarded_headers: bool = False
    max_body_bytes: PositiveInt = 8 * 1024 * 1024
    max_payment_header_bytes: PositiveInt = 16 * 1024  # clients echo our bazaar extension
    cors_origins: tuple[str, ...] = ("*",)
    # 402-path rate limits (0 turns one off): unpaid challenges per client IP, and refused
    # payment attempts per payer (each refusal may have cost an RPC simulation).
    challenge_rate_per_ip: float = Field(default=50.0, ge=0)
    challenge_burst_per_ip: PositiveInt = 200
    refusal_rate_per_payer: float = Field(default=1.0, ge=0)
    refusal_burst_per_payer: PositiveInt = 20
    max_active_tasks_per_payer: int = Field(default=16, ge=0)  # 0: no limit

    # Storage and work.
    database: Path = Path("x402-gateway.db")
    media_dir: Path = Path("media")
    media_retention_hours: PositiveInt = 72
    pricing_file: Path | None = None  # None: the shipped default (gateway/pricing.toml)
    worker_concurrency: PositiveInt = 2
    task_timeout_seconds: PositiveInt = 600
    upstream_base_url: str | None = None
    upstream_api_key: SecretStr | None = None
    allow_private_urls: bool = False  # image/webhook URLs to loopback/private ranges
    # Single "ip:port" destinations trusted despite the address rules (an internal webhook
    # receiver, say), without opening every private address.
    allowed_url_endpoints: tuple[str, ...] = ()

    @field_validator("allowed_url_endpoints")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            host, sep, port = entry.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ValueError(f"{entry!r} is not ip:port")
            ipaddress.ip_address(host.strip("[]"))
        return value

    def url_endpoints(self) -> frozenset[tuple[str, int]]:
        pairs = (entry.rpartition(":") for entry in self.allowed_url_endpoints)
        return frozenset(
            (str(ipaddress.ip_address(host.strip("[]"))), int(port)) for host, _, port in pairs
        )

    # Proxy mode (`serve --upstream URL`): a paywall in front of any HTTP API instead of the
    # generation routes. Routes and prices come from a TOML file (gateway/proxy_routes.py).
    proxy_upstream: str | None = None
    proxy_routes_file: Path | None = None
    proxy_unpriced: Literal["pass", "refuse"] = "refuse"  # routes the file does not price
    proxy_timeout_seconds: PositiveInt = 60
    # HMAC key that signs the verified-payer headers sent upstream (the upstream checks it).
    proxy_secret: SecretStr | None = None

    # Remote facilitator mode: verify and settle through an x402 facilitator (`POST /verify`,
    # `POST /settle`) instead of our own settler; the ledger still reserves first.
    facilitator_url: str | None = None
    facilitator_auth_header: SecretStr | None = None  # "Name: value", sent on every call
    facilitator_timeout_seconds: PositiveInt = 30
    facilitator_retries: int = Field(default=3, ge=0)

    # Our facilitator service (`x402-gateway facilitator`): the bearer token callers must send.
    facilitator_token: SecretStr | None = None

    mode: Literal["production", "dev"] = "production"
    # Test-only fault injection; refused outside dev mode.
    fault_injection: bool = False

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _check_safety(self) -> Settings:
        if self.settler_key is not None and self.settler_key_file is not None:
            raise ValueError("set either settler_key or settler_key_file, not both")
        if self.fault_injection and self.mode != "dev":
            raise ValueError("fault_injection is only allowed in dev mode")
        return self

    def load_settler_key(self) -> str:
        """The settler key, from the env or a 0600 file; dev keys are refused in production."""
        if self.settler_key is not None:
            key = self.settler_key.get_secret_value().strip()
        elif self.settler_key_file is not None:
            key = _read_key_file(self.settler_key_file)
        else:
            raise SettingsError("no settler key: set X402_SETTLER_KEY or X402_SETTLER_KEY_FILE")
        try:
            address = Account.from_key(key).address
        except Exception as exc:  # eth-account raises several types for a bad key
            raise SettingsError("the settler key is not a valid secp256k1 private key") from exc
        if self.mode != "dev" and address.lower() in WELL_KNOWN_DEV_ADDRESSES:
            raise SettingsError(
                "the settler key is a well-known Anvil/Hardhat dev key; "
                "it is only accepted by `x402-gateway dev`"
            )
        return key


def _read_key_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SettingsError(f"cannot read settler key file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SettingsError(
            f"settler key file {path} must not be readable by group or others (chmod 600)"
        )
    with open(path, encoding="ascii") as fh:
        return fh.read().strip()
