"""HTTP bodies of the generation API (pydantic at the boundary only).

`templateData` may arrive as an object or as a JSON string (the seed clients send both). Unknown
options are refused rather than ignored: a payer must never pay for an option we drop silently.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

__all__ = ["MAX_PROMPT_CHARS", "CreateGeneration", "TemplateData", "field_errors"]

MAX_PROMPT_CHARS = 2000
MAX_IMAGE_URL_CHARS = 16 * 1024 * 1024  # a data: URL carries the image itself


class TemplateData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    videoModel: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    duration: Annotated[StrictInt, Field(ge=1, le=600)] = 4
    image: Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS)] | None = None
    autoEnhance: StrictBool = False
    templateName: Annotated[str, Field(min_length=1, max_length=64)] | None = None

    @field_validator("image")
    @classmethod
    def _image_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://", "data:")):
            raise ValueError("image must be an http(s) URL or a data: URL")
        return value


class CreateGeneration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    templateData: TemplateData = TemplateData()
    webhook: Annotated[str, Field(min_length=1, max_length=2048)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("templateData", mode="before")
    @classmethod
    def _template_json_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError("templateData is a string but not valid JSON") from exc
        return value

    @field_validator("webhook")
    @classmethod
    def _webhook_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("webhook must be an http(s) URL")
        return value


def field_errors(errors: list[Any]) -> list[dict[str, str]]:
    """Pydantic errors as `{field, message}` pairs a client can act on (no input echo)."""
    out = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        message = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            message = "unsupported option"
        out.append({"field": loc or "body", "message": message})
    return out
