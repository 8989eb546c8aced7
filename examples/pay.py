"""Pay a running gateway with the official x402 client and follow the task to its end.

    X402_PRIVATE_KEY=0x... python examples/pay.py [GATEWAY_URL] [PROMPT]

With `x402-gateway dev` running, the key and URL default to the first payer in .x402-dev/dev.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import httpx
from eth_account import Account
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client


async def main() -> None:
    dev = Path(".x402-dev/dev.json")
    info = json.loads(dev.read_text()) if dev.exists() else {}
    url = sys.argv[1] if len(sys.argv) > 1 else info.get("gatewayUrl", "http://127.0.0.1:8402")
    prompt = sys.argv[2] if len(sys.argv) > 2 else "a lighthouse at dawn, waves rolling in"
    key = os.environ.get("X402_PRIVATE_KEY") or info["payers"][0]["privateKey"]

    client = register_exact_evm_client(x402Client(), Account.from_key(key))
    async with x402HttpxClient(client, base_url=url, timeout=60) as http:
        paid = await http.post(
            "/generation/create", json={"prompt": prompt, "templateData": {"duration": 4}}
        )
        print(paid.status_code, paid.json())
        paid.raise_for_status()
        task_id = paid.json()["taskId"]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while True:
            status = (await http.get(f"/generation/{task_id}/status")).json()
            print(status["status"], status.get("stage"), status.get("progress"))
            if status["status"] in ("completed", "failed"):
                print(json.dumps(status, indent=2))
                return
            await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
