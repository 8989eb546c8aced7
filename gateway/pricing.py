"""Body-based pricing: a validated generation request -> an integer amount of atomic USDC.

Prices are configured in TOML as human USDC strings and parsed exactly once at load time; a
quote is pure integer arithmetic, so the same body always gets the same price.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from payments.amounts import parse_usdc

__all__ = ["ModelPrice", "PriceBook", "PricingError", "load_price_book"]

Backend = Literal["local", "upstream"]


class PricingError(ValueError):
    """The pricing file is malformed; the message names the entry."""


@dataclass(frozen=True)
class ModelPrice:
    model: str
    backend: Backend
    description: str
    base: int
    per_second: int
    image_surcharge: int
    min_duration: int
    max_duration: int
    upstream_model: str | None = None

    def quote(self, duration: int, *, has_image: bool) -> int:
        return self.base + self.per_second * duration + (self.image_surcharge if has_image else 0)


@dataclass(frozen=True)
class PriceBook:
    models: Mapping[str, ModelPrice]
    default_model: str

    def get(self, model: str | None) -> ModelPrice | None:
        return self.models.get(model or self.default_model)


def load_price_book(path: Path | None = None) -> PriceBook:
    if path is None:
        text = resources.files("gateway").joinpath("pricing.toml").read_text("utf-8")
        origin = "gateway/pricing.toml"
    else:
        text = path.read_text("utf-8")
        origin = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PricingError(f"{origin}: {exc}") from exc
    return _parse(data, origin)


def _parse(data: Mapping[str, Any], origin: str) -> PriceBook:
    raw_models = data.get("models")
    if not isinstance(raw_models, dict) or not raw_models:
        raise PricingError(f"{origin}: no [models.<name>] tables")
    models: dict[str, ModelPrice] = {}
    for name, entry in raw_models.items():
        where = f"{origin}: models.{name}"
        if not isinstance(entry, dict):
            raise PricingError(f"{where} must be a table")
        backend = entry.get("backend", "local")
        if backend not in ("local", "upstream"):
            raise PricingError(f"{where}.backend must be 'local' or 'upstream'")
        try:
            price = ModelPrice(
                model=name,
                backend=backend,
                description=str(entry.get("description", name)),
                base=parse_usdc(str(entry["base"])),
                per_second=parse_usdc(str(entry.get("per_second", "0"))),
                image_surcharge=parse_usdc(str(entry.get("image_surcharge", "0"))),
                min_duration=int(entry.get("min_duration", 1)),
                max_duration=int(entry.get("max_duration", 20)),
                upstream_model=entry.get("upstream_model"),
            )
        except KeyError as exc:
            raise PricingError(f"{where} is missing {exc.args[0]!r}") from exc
        except ValueError as exc:
            raise PricingError(f"{where}: {exc}") from exc
        if not 1 <= price.min_duration <= price.max_duration:
            raise PricingError(f"{where}: need 1 <= min_duration <= max_duration")
        if price.quote(price.min_duration, has_image=False) <= 0:
            raise PricingError(f"{where}: a quote must be above zero")
        models[name] = price
    default = data.get("default_model", next(iter(models)))
    if default not in models:
        raise PricingError(f"{origin}: default_model {default!r} is not a configured model")
    return PriceBook(models=models, default_model=default)
