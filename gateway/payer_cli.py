"""Payer commands of `x402-gateway`: `quote`, `generate`, `balance`.

The key comes from the environment (`X402_PRIVATE_KEY`) or a 0600 file (`--key-file`), never
from the command line (it would show in `ps` and shell history). `--json` prints one JSON object
per line (``{"event": ...}``) on stdout and no progress bar, for agents.

Exit codes: 0 done; 1 gateway/network error or timeout; 2 usage or configuration; 3 refused by
the spend policy before signing (e.g. quote above `--max-amount`); 4 payment rejected by the
server (reason shown); 5 task failed (refund shown); 6 payment sent but unconfirmed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import mimetypes
import os
import stat
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from gateway.client_tasks import (
    GatewayError,
    GenerationClient,
    TaskUpdate,
    build_body,
    fetch_quote,
)
from payments import (
    InvalidAmount,
    Network,
    UnknownNetworkError,
    format_usdc,
    get_network,
    normalize_address,
    parse_usdc,
)
from payments.chain import Chain
from payments.client import (
    Offer,
    Payer,
    PaymentRefused,
    PaymentRejected,
    PaymentUnconfirmed,
    Receipt,
    SpendPolicy,
)
from payments.errors import PaymentError

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_REJECTED",
    "EXIT_TASK_FAILED",
    "EXIT_UNCONFIRMED",
    "EXIT_USAGE",
    "add_commands",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_REFUSED: Final = 3
EXIT_REJECTED: Final = 4
EXIT_TASK_FAILED: Final = 5
EXIT_UNCONFIRMED: Final = 6

KEY_ENV: Final = "X402_PRIVATE_KEY"
DEFAULT_GATEWAY: Final = "http://127.0.0.1:8402"
PUBLIC_RPC: Final = {"base": "https://mainnet.base.org", "base-sepolia": "https://sepolia.base.org"}
MAX_IMAGE_FILE: Final = 10 * 1024 * 1024


class _Fail(Exception):
    """A one-line reason and the exit code that goes with it."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        self.message = message
        super().__init__(message)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `quote`, `generate` and `balance` on the `x402-gateway` parser."""
    quote = subparsers.add_parser("quote", help="show the price of a generation (pays nothing)")
    _request_options(quote)
    quote.set_defaults(func=_run(_quote))

    generate = subparsers.add_parser(
        "generate", help="pay for a generation, follow it, download the video"
    )
    _request_options(generate)
    generate.add_argument(
        "--max-amount",
        required=True,
        metavar="USDC",
        help="most this payment may cost, in USDC (e.g. 0.50); a higher quote is refused",
    )
    generate.add_argument("--out", type=Path, help="where to save the video (default TASKID.mp4)")
    generate.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for it")
    _key_options(generate)
    generate.set_defaults(func=_run(_generate))

    balance = subparsers.add_parser("balance", help="USDC and ETH balances of an address")
    balance.add_argument("--address", help=f"default: the address of ${KEY_ENV} / --key-file")
    balance.add_argument("--rpc-url", default=os.environ.get("X402_RPC_URL"), help="JSON-RPC URL")
    balance.add_argument("--json", action="store_true", help="machine-readable output")
    _key_options(balance)
    balance.set_defaults(func=_run(_balance))


def _request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to generate")
    parser.add_argument("--duration", type=int, help="seconds of video")
    parser.add_argument("--model", help="video model (default: the gateway's)")
    parser.add_argument("--image", metavar="PATH|URL", help="input image: a file or an URL")
    parser.add_argument(
        "--gateway",
        default=os.environ.get("X402_GATEWAY_URL", DEFAULT_GATEWAY),
        metavar="URL",
        help=f"gateway base URL (default $X402_GATEWAY_URL or {DEFAULT_GATEWAY})",
    )
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout, no progress")


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-file", type=Path, help=f"0600 file with the key (else ${KEY_ENV})")
    parser.add_argument("--network", default="base", help="base, base-sepolia or a CAIP-2 id")


# --------------------------------------------------------------------------- plumbing


class _Out:
    """Human lines on stderr/stdout, or JSON lines on stdout."""

    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def event(self, name: str, **fields: Any) -> None:
        if self.json:
            print(json.dumps({"event": name, **fields}, separators=(",", ":")), flush=True)

    def say(self, text: str) -> None:
        if not self.json:
            print(text, flush=True)


def _run(command: Callable[[argparse.Namespace, _Out], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if not os.environ.get("X402_LOG_LEVEL"):  # keep INFO logs off the progress bar
            for name in ("x402", "httpx", "httpcore", "web3"):
                logging.getLogger(name).setLevel(logging.WARNING)
        out = _Out(getattr(args, "json", False))
        try:
            return command(args, out)
        except _Fail as fail:
            out.event("error", reason=fail.reason, message=fail.message, exitCode=fail.code)
            print(f"x402-gateway: {fail.message}", file=sys.stderr, flush=True)
            return fail.code
        except KeyboardInterrupt:
            return 130

    return run


def _network(name: str) -> Network:
    try:
        return get_network(name)
    except UnknownNetworkError:
        raise _Fail(EXIT_USAGE, "unknown_network", f"unknown network {name!r}") from None


def _load_key(key_file: Path | None) -> str:
    if key_file is not None:
        try:
            mode = key_file.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise _Fail(
                    EXIT_USAGE, "key_file_mode", f"{key_file} is readable by others: chmod 600 it"
                )
            key = key_file.read_text(encoding="ascii").strip()
        except OSError as exc:
            raise _Fail(EXIT_USAGE, "no_key", f"cannot read {key_file}: {exc.strerror}") from None
    else:
        key = os.environ.get(KEY_ENV, "").strip()
        if not key:
            raise _Fail(EXIT_USAGE, "no_key", f"no key: set {KEY_ENV} or pass --key-file")
    return key


def _image(value: str | None) -> str | None:
    """URLs pass as they are; a local file becomes a data: URL."""
    if value is None or value.startswith(("http://", "https://", "data:")):
        return value
    path = Path(value)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_FILE:
            raise _Fail(EXIT_USAGE, "image_too_large", f"{path} is above {MAX_IMAGE_FILE} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise _Fail(EXIT_USAGE, "image_unreadable", f"cannot read {path}: {exc.strerror}") from None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _body(args: argparse.Namespace) -> dict[str, Any]:
    return build_body(
        args.prompt, duration=args.duration, model=args.model, image=_image(args.image)
    )


def _offer_fields(offer: Offer) -> dict[str, Any]:
    return {
        "amount": str(offer.amount),
        "amountUsdc": format_usdc(offer.amount),
        "network": offer.network,
        "asset": offer.asset,
        "payTo": offer.pay_to,
        "x402Version": offer.version,
        "resource": offer.resource,
        "description": offer.description,
    }


def _describe(offer: Offer, body: dict[str, Any]) -> str:
    template = body.get("templateData", {})
    options = ", ".join(f"{k}={v}" for k, v in template.items() if k != "image")
    if "image" in template:
        options = f"{options}, with an image" if options else "with an image"
    what = offer.description or "generation"
    return (
        f"Quote: {format_usdc(offer.amount)} USDC for {what}"
        + (f" ({options})" if options else "")
        + f"\n  pay to {offer.pay_to} on {offer.network}, asset {offer.asset}"
    )


def _gateway_fail(exc: GatewayError) -> _Fail:
    return _Fail(
        EXIT_ERROR, exc.reason, f"gateway answered {exc.status} {exc.reason}: {exc.message}"
    )


def _http_fail(exc: httpx.HTTPError) -> _Fail:
    return _Fail(EXIT_ERROR, "http_error", f"cannot reach the gateway: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- quote


def _quote(args: argparse.Namespace, out: _Out) -> int:
    return asyncio.run(_quote_async(args, out))


async def _quote_async(args: argparse.Namespace, out: _Out) -> int:
    body = _body(args)
    try:
        async with httpx.AsyncClient(timeout=30.0) as http:
            challenge = await fetch_quote(http, args.gateway, body)
    except GatewayError as exc:
        raise _gateway_fail(exc) from None
    except httpx.HTTPError as exc:
        raise _http_fail(exc) from None
    offers = challenge.v2 or challenge.v1
    if not offers:
        raise _Fail(EXIT_ERROR, "no_offer", "the gateway answered 402 without a usable offer")
    cheapest = min(offers, key=lambda o: o.amount)
    out.event("quote", **_offer_fields(cheapest), offers=[_offer_fields(o) for o in offers])
    out.say(_describe(cheapest, body))
    return EXIT_OK


# --------------------------------------------------------------------------- generate


def _generate(args: argparse.Namespace, out: _Out) -> int:
    try:
        max_amount = parse_usdc(args.max_amount)
    except InvalidAmount as exc:
        raise _Fail(EXIT_USAGE, "invalid_amount", f"--max-amount: {exc}") from None
    network = _network(args.network)
    key = _load_key(args.key_file)
    body = _body(args)

    def approve(offer: Offer) -> bool:
        out.event("quote", **_offer_fields(offer))
        out.say(_describe(offer, body))
        return True

    try:
        payer = Payer(key, SpendPolicy(networks=(network,), max_amount=max_amount, approve=approve))
    except ValueError:
        raise _Fail(EXIT_USAGE, "invalid_key", "the key is not a valid private key") from None
    return asyncio.run(_generate_async(args, out, payer, body))


async def _generate_async(
    args: argparse.Namespace, out: _Out, payer: Payer, body: dict[str, Any]
) -> int:
    async with payer.async_client(timeout=60.0) as http:
        client = GenerationClient(http, args.gateway)
        try:
            created = await client.create(body)
        except PaymentRefused as exc:
            if exc.offer is not None:
                out.event("quote", **_offer_fields(exc.offer))
                out.say(_describe(exc.offer, body))
            raise _Fail(EXIT_REFUSED, exc.reason, _refusal(exc, args.max_amount)) from None
        except PaymentRejected as exc:
            raise _Fail(
                EXIT_REJECTED, exc.reason, f"payment rejected by the gateway: {exc}"
            ) from None
        except PaymentUnconfirmed as exc:
            raise _Fail(EXIT_UNCONFIRMED, "payment_unconfirmed", str(exc)) from None
        except PaymentError as exc:
            raise _Fail(EXIT_ERROR, "payment_error", str(exc)) from None
        except GatewayError as exc:
            raise _gateway_fail(exc) from None
        except httpx.HTTPError as exc:
            raise _http_fail(exc) from None

        receipt = created.receipt
        out.event("paid", taskId=created.task_id, **_receipt_fields(receipt))
        if receipt is not None:
            out.say(
                f"Paid {format_usdc(receipt.amount)} USDC, tx {receipt.transaction} "
                f"({receipt.network}); task {created.task_id}"
            )
        try:
            final = await _follow(client, created.task_id, out, args.timeout)
        except TimeoutError as exc:
            raise _Fail(EXIT_ERROR, "timeout", str(exc)) from None
        except GatewayError as exc:
            raise _gateway_fail(exc) from None
        except httpx.HTTPError as exc:
            raise _http_fail(exc) from None

        if final.status != "completed":
            final = await _await_refund(client, final)
            refund = final.refund or {}
            message = (
                f"task {final.task_id} failed ({final.error or 'no reason given'}); "
                f"refund {refund.get('status', 'unknown')}"
                + (f", tx {refund['transaction']}" if refund.get("transaction") else "")
            )
            out.event(
                "result",
                status=final.status,
                taskId=final.task_id,
                error=final.error,
                refund=dict(refund) or None,
            )
            raise _Fail(EXIT_TASK_FAILED, "task_failed", message)

        video = final.video_url
        if video is None:
            raise _Fail(EXIT_ERROR, "no_result", f"task {final.task_id} completed without a video")
        target: Path = args.out or Path(f"{final.task_id}.mp4")
        try:
            size = await client.download(video, target)
        except GatewayError as exc:
            raise _gateway_fail(exc) from None
        except (httpx.HTTPError, OSError) as exc:
            raise _Fail(EXIT_ERROR, "download_failed", f"cannot save the video: {exc}") from None
        out.event(
            "result",
            status="completed",
            taskId=final.task_id,
            out=str(target),
            bytes=size,
            videoUrl=video,
            **_receipt_fields(receipt),
        )
        out.say(f"Saved {target} ({size} bytes)")
        if receipt is not None:
            out.say(f"Amount paid: {format_usdc(receipt.amount)} USDC, tx {receipt.transaction}")
        return EXIT_OK


async def _await_refund(
    client: GenerationClient, update: TaskUpdate, limit_s: float = 30.0
) -> TaskUpdate:
    """A failed task's refund is sent after the failure: give it a moment to confirm."""
    deadline = time.monotonic() + limit_s
    while (update.refund or {}).get("status") == "pending" and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        try:
            update, _ = await client.status(update.task_id)
        except (GatewayError, httpx.HTTPError):
            break
    return update


def _refusal(exc: PaymentRefused, max_amount: str) -> str:
    if exc.reason == "amount_above_max" and exc.offer is not None:
        return (
            f"quote {format_usdc(exc.offer.amount)} USDC is above --max-amount {max_amount} USDC;"
            " nothing was paid"
        )
    return f"payment refused before signing ({exc.reason}): {exc.detail}; nothing was paid"


def _receipt_fields(receipt: Receipt | None) -> dict[str, Any]:
    if receipt is None:
        return {"transaction": None}
    return {
        "transaction": receipt.transaction,
        "amount": str(receipt.amount),
        "amountUsdc": format_usdc(receipt.amount),
        "network": receipt.network,
        "payer": receipt.payer,
    }


async def _follow(client: GenerationClient, task_id: str, out: _Out, limit_s: float) -> TaskUpdate:
    if out.json:
        return await client.follow(
            task_id,
            on_update=lambda u: out.event(
                "status", taskId=u.task_id, status=u.status, stage=u.stage, progress=u.progress
            ),
            timeout_s=limit_s,
        )
    progress = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=out.err,
    )
    with progress:
        bar: TaskID = progress.add_task("queued", total=100)

        def show(update: TaskUpdate) -> None:
            label = update.status
            if update.stage and not update.terminal:
                label = f"{update.status}: {update.stage}"
            progress.update(bar, completed=update.progress, description=label)

        return await client.follow(task_id, on_update=show, timeout_s=limit_s)


# --------------------------------------------------------------------------- balance


def _balance(args: argparse.Namespace, out: _Out) -> int:
    network = _network(args.network)
    if args.address:
        try:
            address = normalize_address(args.address)
        except ValueError:
            raise _Fail(
                EXIT_USAGE, "invalid_address", f"{args.address!r} is not an address"
            ) from None
    else:
        try:
            address = Payer(_load_key(args.key_file)).address
        except ValueError:
            raise _Fail(EXIT_USAGE, "invalid_key", "the key is not a valid private key") from None
    rpc_url = args.rpc_url or PUBLIC_RPC.get(network.name)
    if not rpc_url:
        raise _Fail(EXIT_USAGE, "no_rpc", "no RPC URL for this network: pass --rpc-url")
    try:
        usdc, eth = asyncio.run(_read_balances(rpc_url, network, address))
    except PaymentError as exc:
        raise _Fail(
            EXIT_ERROR, "rpc_error", f"cannot read balances from {rpc_url}: {exc}"
        ) from None
    out.event(
        "balance",
        address=address,
        network=network.caip2,
        asset=network.usdc,
        usdc=str(usdc),
        usdcFormatted=format_usdc(usdc),
        ethWei=str(eth),
        eth=_format_eth(eth),
    )
    out.say(f"{address} on {network.name} ({network.caip2})")
    out.say(f"  USDC  {format_usdc(usdc)}")
    out.say(f"  ETH   {_format_eth(eth)}")
    return EXIT_OK


async def _read_balances(rpc_url: str, network: Network, address: str) -> tuple[int, int]:
    async with Chain(rpc_url, network.usdc, request_timeout=15.0) as chain:
        return await chain.balance_of(address), await chain.eth_balance(address)


def _format_eth(wei: int) -> str:
    text = format(Decimal(wei).scaleb(-18), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
