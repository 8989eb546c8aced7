"""The priced route `POST /generation/create`: validate the body, refuse what cannot be done,
and quote it. Everything here runs before any payment is asked for."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from gateway.errors import BadRequest
from gateway.middleware import Quote
from gateway.pricing import ModelPrice, PriceBook
from gateway.schemas import CreateGeneration, field_errors
from payments import Discovery, Network, Requirement
from payments.wire import json_nesting_exceeds

__all__ = ["OUTPUT_SCHEMA", "CreateGenerationRoute", "GenerationQuote", "input_schema"]

_MAX_JSON_DEPTH = 16
_CACHEABLE_BODY_BYTES = 4096
_CACHE_ENTRIES = 1024
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class GenerationQuote:
    body: CreateGeneration
    price: ModelPrice
    image: bytes | None = None  # a data: URL image, decoded and checked before payment

    @property
    def model(self) -> str:
        return self.price.model


OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "taskId": {"type": "string", "description": "poll GET /generation/{taskId}/status"}
    },
    "required": ["taskId"],
}


class CreateGenerationRoute:
    method = "POST"
    path = "/generation/create"
    mime_type = "application/json"

    def __init__(
        self,
        prices: PriceBook,
        *,
        network: Network,
        asset: str,
        pay_to: str,
        max_timeout_seconds: int,
        available: Callable[[ModelPrice], bool],
        inspect: Callable[[CreateGeneration], Awaitable[bytes | None]] | None = None,
    ) -> None:
        self.prices = prices
        self.network = network
        self.asset = asset
        self.pay_to = pay_to
        self.max_timeout_seconds = max_timeout_seconds
        self.available = available
        self.inspect = inspect
        self.description = "Generate a video from a prompt (optionally an image); answers a taskId"
        self.input_schema = input_schema(prices)
        self.discovery = Discovery(
            input_schema=self.input_schema,
            input_example={"prompt": "a lighthouse at dawn", "templateData": {"duration": 4}},
            output_schema=OUTPUT_SCHEMA,
            method=self.method,
        )
        self._quotes: OrderedDict[bytes, Quote] = OrderedDict()
        self._offers: OrderedDict[tuple[int, str, str], tuple[Requirement, ...]] = OrderedDict()

    async def quote(self, body: bytes) -> Quote:
        # Same body, same quote: an agent's paid retry repeats the body of its 402, so small
        # bodies with no external inputs (URLs to re-check) are answered from a bounded cache.
        cached = self._quotes.get(body) if len(body) <= _CACHEABLE_BODY_BYTES else None
        if cached is not None:
            self._quotes.move_to_end(body)
            return cached
        quote = await self._quote(body)
        gq: GenerationQuote = quote.request
        if (
            len(body) <= _CACHEABLE_BODY_BYTES
            and gq.body.templateData.image is None
            and gq.body.webhook is None
        ):
            _remember(self._quotes, body, quote)
        return quote

    async def _quote(self, body: bytes) -> Quote:
        if json_nesting_exceeds(body, _MAX_JSON_DEPTH):
            raise BadRequest("request body is nested too deeply", reason="invalid_json")
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise BadRequest("request body must be a JSON object", reason="invalid_json") from exc
        if not isinstance(raw, dict):
            raise BadRequest("request body must be a JSON object", reason="invalid_json")
        try:
            request = CreateGeneration.model_validate(raw)
        except ValidationError as exc:
            raise BadRequest(
                "invalid request body", errors=field_errors(exc.errors(include_input=False))
            ) from exc

        template = request.templateData
        price = self.prices.get(template.videoModel)
        if price is None:
            raise BadRequest(
                f"unknown model {template.videoModel!r}",
                reason="unknown_model",
                errors=[{"field": "templateData.videoModel", "message": _known(self.prices)}],
            )
        if not self.available(price):
            raise BadRequest(
                f"model {price.model!r} is not available on this gateway",
                reason="model_unavailable",
                errors=[{"field": "templateData.videoModel", "message": "not configured"}],
            )
        if not price.min_duration <= template.duration <= price.max_duration:
            raise BadRequest(
                f"duration must be {price.min_duration}..{price.max_duration} s for {price.model}",
                reason="invalid_duration",
                errors=[
                    {
                        "field": "templateData.duration",
                        "message": f"between {price.min_duration} and {price.max_duration}",
                    }
                ],
            )
        # Inputs that point elsewhere (image, webhook) are checked before asking for money.
        image = await self.inspect(request) if self.inspect is not None else None
        amount = price.quote(template.duration, has_image=template.image is not None)
        return Quote(amount=amount, request=GenerationQuote(body=request, price=price, image=image))

    def requirements(self, quote: Quote, resource_url: str) -> Sequence[Requirement]:
        gq: GenerationQuote = quote.request
        description = f"{gq.price.description}; {gq.body.templateData.duration} s"
        key = (quote.amount, description, resource_url)
        offered = self._offers.get(key)
        if offered is None:
            offered = self._build_requirements(quote.amount, description, resource_url)
            _remember(self._offers, key, offered)
        return offered

    def _build_requirements(
        self, amount: int, description: str, resource_url: str
    ) -> tuple[Requirement, ...]:
        return (
            Requirement(
                network=self.network,
                amount=amount,
                asset=self.asset,
                pay_to=self.pay_to,
                max_timeout_seconds=self.max_timeout_seconds,
                resource_url=resource_url,
                description=description,
                mime_type=self.mime_type,
                discovery=self.discovery,
            ),
        )


def _remember(cache: OrderedDict[K, V], key: K, value: V) -> None:
    cache[key] = value
    if len(cache) > _CACHE_ENTRIES:
        cache.popitem(last=False)


def _known(prices: PriceBook) -> str:
    return "known models: " + ", ".join(sorted(prices.models))


def input_schema(prices: PriceBook) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "maxLength": 2000, "description": "what to generate"},
            "templateData": {
                "type": "object",
                "properties": {
                    "videoModel": {
                        "type": "string",
                        "enum": sorted(prices.models),
                        "default": prices.default_model,
                    },
                    "duration": {"type": "integer", "minimum": 1, "description": "seconds"},
                    "image": {"type": "string", "description": "http(s) or data: URL"},
                    "autoEnhance": {"type": "boolean"},
                    "templateName": {"type": "string"},
                },
                "additionalProperties": False,
            },
            "webhook": {"type": "string", "description": "Standard Webhooks endpoint"},
        },
        "additionalProperties": False,
    }
