"""`x402-gateway` command line: `serve` (real networks) and `dev` (a local Anvil chain)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from pydantic import SecretStr, ValidationError

from gateway.app import create_app
from gateway.settings import Settings, SettingsError

__all__ = ["main"]

DEV_USDC_PER_PAYER = 100_000_000  # 100 USDC
DEV_ETH_PER_PAYER = 10**19


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("X402_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except (SettingsError, ValidationError) as exc:
        print(f"x402-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x402-gateway", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the gateway on a real network (settings from env)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8402)
    serve.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-*")
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="proxy mode: sell the routes of --routes in front of this HTTP API",
    )
    serve.add_argument(
        "--routes", type=Path, metavar="FILE", help="proxy mode: priced routes (TOML)"
    )
    serve.add_argument(
        "--unpriced",
        choices=("pass", "refuse"),
        help="proxy mode: forward routes the file does not price, or refuse them (default)",
    )
    serve.set_defaults(func=_serve)

    dev = sub.add_parser("dev", help="run a local Anvil chain with test USDC and the gateway")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8402)
    dev.add_argument("--state-dir", type=Path, default=Path(".x402-dev"))
    dev.add_argument("--anvil", default=None, help="anvil binary (else $ANVIL_BIN, npm copy, PATH)")
    dev.add_argument("--payers", type=int, default=3, help="funded payer accounts to create")
    dev.set_defaults(func=_dev)

    facilitator = sub.add_parser(
        "facilitator",
        help="serve our x402 facilitator (POST /verify, /settle, GET /supported; env settings)",
    )
    facilitator.add_argument("--host", default="127.0.0.1")
    facilitator.add_argument("--port", type=int, default=8403)
    facilitator.set_defaults(func=_facilitator)

    from gateway.payer_cli import add_commands

    add_commands(sub)  # quote, generate, balance
    return parser


def _serve(args: argparse.Namespace) -> int:
    proxy: dict[str, object] = {}
    if args.upstream is not None:
        proxy["proxy_upstream"] = args.upstream
    if args.routes is not None:
        proxy["proxy_routes_file"] = args.routes
    if args.unpriced is not None:
        proxy["proxy_unpriced"] = args.unpriced
    settings = Settings(trust_forwarded_headers=args.proxy_headers, **proxy)  # type: ignore[arg-type]
    if settings.public_base_url is None:
        # Result URLs must be absolute; behind a proxy set X402_PUBLIC_BASE_URL instead.
        origin = f"http://{args.host}:{args.port}"
        logging.getLogger("x402.gateway").warning(
            "X402_PUBLIC_BASE_URL is not set; media and resource URLs use %s", origin
        )
        settings = settings.model_copy(update={"public_base_url": origin})
    if settings.proxy_upstream is not None:
        from gateway.proxy_app import create_proxy_app

        app = create_proxy_app(settings)  # loads the key and the routes: fails before binding
    elif settings.proxy_routes_file is not None or args.unpriced is not None:
        raise SettingsError("--routes and --unpriced need --upstream URL (proxy mode)")
    else:
        app = create_app(settings)  # loads the key (or checks payTo): fails before binding
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        proxy_headers=args.proxy_headers,
        log_level="info",
        access_log=False,
    )
    uvicorn.Server(config).run()
    return 0


def _facilitator(args: argparse.Namespace) -> int:
    from gateway.facilitator_app import create_facilitator_app

    settings = Settings()
    app = create_facilitator_app(settings)  # loads the settler key: fails before binding
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False)
    uvicorn.Server(config).run()
    return 0


def _dev(args: argparse.Namespace) -> int:
    from payments.localchain import LocalChain

    state_dir: Path = args.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    chain = LocalChain(anvil_path=args.anvil)
    chain.start()
    try:
        settler_address, settler_key = chain.accounts[0]
        payers = []
        for address, key in chain.accounts[1 : 1 + args.payers]:
            chain.fund(address, usdc=DEV_USDC_PER_PAYER, eth_wei=DEV_ETH_PER_PAYER)
            payers.append({"address": address, "privateKey": key})
        gateway_url = f"http://{args.host}:{args.port}"
        settings = Settings(
            mode="dev",
            network="base",
            rpc_url=chain.rpc_url,
            settler_key=SecretStr(settler_key),
            pay_to=settler_address,
            database=state_dir / "gateway.db",
            media_dir=state_dir / "media",
            public_base_url=gateway_url,
            allow_private_urls=True,
        )
        info = {
            "gatewayUrl": gateway_url,
            "rpcUrl": chain.rpc_url,
            "chainId": chain.chain_id,
            "network": "eip155:8453",
            "asset": chain.usdc_address,
            "payTo": settler_address,
            "payers": payers,
        }
        app = create_app(settings)
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level="info", access_log=False
        )
        server = uvicorn.Server(config)
        # uvicorn re-raises the signal that stopped it; turn both into an exception so the
        # chain is stopped below instead of being orphaned by a default SIGTERM death.
        signal.signal(signal.SIGTERM, _stop_requested)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_dev(server, info, state_dir / "dev.json"))
        return 0 if server.started else 1
    finally:
        chain.stop()


def _stop_requested(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _serve_dev(server: uvicorn.Server, info: dict[str, object], path: Path) -> None:
    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(path)
        _print_dev_banner(info, path)

    announcer = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        announcer.cancel()


def _print_dev_banner(info: dict[str, object], path: Path) -> None:
    payers = info["payers"]
    assert isinstance(payers, list)
    first = payers[0] if payers else {"privateKey": "<none>"}
    lines = [
        "",
        "x402-gateway dev is running on a local chain (Anvil, chain id 8453, test USDC).",
        f"  gateway  {info['gatewayUrl']}",
        f"  rpc      {info['rpcUrl']}",
        f"  asset    {info['asset']} (test USDC at the canonical Base address)",
        f"  payTo    {info['payTo']}",
        f"  state    {path}  (endpoints and funded payer keys, for scripts)",
        "Funded payer keys (test only, 100 USDC each):",
        *(f"  {p['address']}  {p['privateKey']}" for p in payers),
        "Try it:",
        f"  X402_PRIVATE_KEY={first['privateKey']} \\",
        "    .venv/bin/x402-gateway generate 'a lighthouse at dawn' --duration 4 \\",
        f"    --gateway {info['gatewayUrl']} --max-amount 0.50 --out lighthouse.mp4",
        "  or, with the official x402 client: .venv/bin/python examples/pay.py",
        "Ctrl-C stops the gateway and the chain.",
        "",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
