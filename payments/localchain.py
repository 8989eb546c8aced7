"""A local Anvil chain with test USDC at the canonical Base address (tests and dev mode).

Synchronous on purpose: pytest session fixtures and the CLI use it before any event loop runs.
`start()` launches the native anvil binary on 127.0.0.1 (chain id 8453 by default), deploys
`TestUSDC` from the committed artifact and copies its runtime code to
0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913 with `anvil_setCode`, so everything downstream sees
exactly mainnet's chain id, asset address and EIP-712 domain.

The native binary, never `node_modules/.bin/anvil`: that npm wrapper exits 0 when anvil fails.
The last dev account is reserved for the harness (deploys, mints); `accounts` lists the others,
so an app under test can use them without nonce races with the harness.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, NamedTuple, Self

import httpx
from eth_abi.abi import decode, encode
from eth_utils.abi import function_signature_to_4byte_selector
from eth_utils.address import to_checksum_address

__all__ = [
    "ARTIFACTS_DIR",
    "CANONICAL_USDC",
    "DevAccount",
    "LocalChain",
    "LocalChainError",
    "RpcError",
    "TransactionReverted",
    "encode_call",
    "find_anvil",
    "load_artifact",
]

CANONICAL_USDC: Final = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
REPO_ROOT: Final = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR: Final = REPO_ROOT / "contracts-fixtures" / "artifacts"

_LISTENING = re.compile(r"Listening on ([0-9.]+):(\d+)")
_TAIL_LINES = 40
_DEFAULT_BALANCE_ETH = 10_000


class LocalChainError(RuntimeError):
    """Anvil could not be found or started, or a harness transaction failed."""


class RpcError(LocalChainError):
    """A JSON-RPC error answer; `data` holds revert data (0x-hex) when the node sent it."""

    def __init__(self, method: str, code: int, message: str, data: str | None) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.method = method
        self.code = code
        self.message = message
        self.data = data


class TransactionReverted(LocalChainError):
    """A harness transaction was mined with status 0; `reason` is its Error(string), if any."""

    def __init__(self, tx_hash: str, reason: str | None, output: str | None) -> None:
        super().__init__(f"transaction {tx_hash} reverted: {reason or 'no reason given'}")
        self.tx_hash = tx_hash
        self.reason = reason
        self.output = output


class DevAccount(NamedTuple):
    address: str  # checksummed
    private_key: str  # 0x-prefixed hex


def find_anvil(explicit: str | None = None) -> str:
    """Resolve the anvil binary: explicit path, $ANVIL_BIN, the npm platform package, PATH."""
    if explicit:
        return _require_executable(explicit, "anvil_path")
    env = os.environ.get("ANVIL_BIN")
    if env:
        return _require_executable(env, "$ANVIL_BIN")
    bundled = _npm_platform_binary()
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    on_path = shutil.which("anvil")
    # Skip the npm wrapper if node_modules/.bin happens to be on PATH.
    if on_path and Path(on_path).parent.name != ".bin":
        return on_path
    raise LocalChainError(
        f"anvil not found: pass anvil_path, set $ANVIL_BIN, run scripts/setup (expects {bundled}),"
        " or put anvil on PATH"
    )


def _npm_platform_binary() -> Path:
    system = {"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}.get(
        platform.system(), platform.system().lower()
    )
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )
    exe = "anvil.exe" if system == "win32" else "anvil"
    return REPO_ROOT / "node_modules" / "@foundry-rs" / f"anvil-{system}-{arch}" / "bin" / exe


def _require_executable(path: str, source: str) -> str:
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise LocalChainError(f"anvil from {source} is not an executable file: {path}")
    return path


def load_artifact(name: str) -> dict[str, Any]:
    """Load `contracts-fixtures/artifacts/<name>.json` (abi, bytecode, deployedBytecode, ...)."""
    path = ARTIFACTS_DIR / f"{name}.json"
    try:
        artifact: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocalChainError(f"no contract artifact {path}") from None
    return artifact


def encode_call(signature: str, *args: Any) -> bytes:
    """Calldata for a plain signature such as ``"mint(address,uint256)"`` (no tuple types)."""
    inner = signature[signature.index("(") + 1 : signature.rindex(")")]
    types = [t for t in inner.split(",") if t]
    return function_signature_to_4byte_selector(signature) + encode(types, list(args))


class _StreamTail:
    """Drains a child's pipe on a thread (a full pipe would stall anvil) and keeps the tail."""

    def __init__(self, stream: IO[bytes], on_line: Callable[[str], None] | None = None) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._stream = stream
        self._on_line = on_line
        self._thread = threading.Thread(target=self._run, daemon=True, name="anvil-pipe")
        self._thread.start()

    def _run(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            if self._on_line is not None:
                self._on_line(line)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        return "\n".join(self.lines)


class LocalChain:
    """One anvil process. Use as a context manager, or call `start()` and `stop()`."""

    def __init__(
        self,
        anvil_path: str | None = None,
        port: int | None = None,
        chain_id: int = 8453,
        block_time: float | None = None,
        *,
        accounts: int = 20,
        start_timeout: float = 10.0,
        sweep_interval: float | None = 1.0,
    ) -> None:
        self._anvil_path = anvil_path
        self._requested_port = port
        self._chain_id = chain_id
        self._block_time = block_time
        # Automine can leave a ready transaction unmined when one key's transactions arrive out
        # of nonce order (concurrent sends; foundry-rs/foundry#10122): every later nonce then
        # waits forever. Mixed mining adds an interval block that sweeps such stragglers up.
        self._sweep_interval = sweep_interval
        self._n_accounts = accounts
        self._start_timeout = start_timeout

        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: _StreamTail | None = None
        self._log_path: Path | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._client: httpx.Client | None = None
        self._port: int | None = None
        self._accounts: list[DevAccount] = []
        self._harness: DevAccount | None = None
        self._rpc_id = 0
        self._rpc_lock = threading.Lock()
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        if self._proc is not None:
            raise LocalChainError("LocalChain already started")
        began = time.monotonic()
        binary = find_anvil(self._anvil_path)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="x402-anvil-")
        config_out = Path(self._tmpdir.name) / "anvil.json"
        cmd = [
            binary,
            "--host",
            "127.0.0.1",
            "--port",
            str(self._requested_port if self._requested_port is not None else 0),
            "--chain-id",
            str(self._chain_id),
            "--accounts",
            str(self._n_accounts + 1),
            "--balance",
            str(_DEFAULT_BALANCE_ETH),
            "--config-out",
            str(config_out),
        ]
        if self._block_time is not None:
            cmd += ["--block-time", str(self._block_time)]
        elif self._sweep_interval is not None:
            cmd += ["--mixed-mining", "--block-time", str(self._sweep_interval)]

        # anvil logs every RPC call to stdout: into a file, not a pipe, so no thread of ours
        # spends CPU (and the GIL) draining it while the chain is busy.
        self._log_path = Path(self._tmpdir.name) / "anvil.log"
        atexit.register(self.stop)
        try:
            # Own session: a Ctrl-C in the terminal reaches the gateway, which then stops anvil
            # after it has finished in-flight settlements (not the other way round).
            with open(self._log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            assert self._proc.stderr is not None
            self._stderr = _StreamTail(self._proc.stderr)
            self._wait_listening(began)
            self._client = httpx.Client(timeout=10.0)
            self._wait_rpc(began)
            self._load_accounts(config_out, began)
            self._install_usdc()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _deadline_left(self, began: float) -> float:
        return self._start_timeout - (time.monotonic() - began)

    def _wait_listening(self, began: float) -> None:
        assert self._proc is not None
        while True:
            match = _LISTENING.search(self._log_text())
            if match:
                self._port = int(match.group(2))
                return
            time.sleep(0.002)
            if self._proc.poll() is not None:
                raise LocalChainError(self._death_report())
            if self._deadline_left(began) <= 0:
                raise LocalChainError(
                    f"anvil did not start listening within {self._start_timeout} s\n"
                    + self._output_tail()
                )

    def _wait_rpc(self, began: float) -> None:
        delay = 0.002
        while True:
            try:
                answered = int(self.rpc("eth_chainId"), 16)
            except httpx.TransportError:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise LocalChainError(self._death_report()) from None
                if self._deadline_left(began) <= 0:
                    raise LocalChainError("anvil RPC did not answer in time") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            if answered != self._chain_id:
                raise LocalChainError(f"anvil reports chain id {answered}, not {self._chain_id}")
            return

    def _load_accounts(self, config_out: Path, began: float) -> None:
        # anvil writes --config-out before it serves RPC; poll briefly in case it is late.
        while not config_out.exists():
            if self._deadline_left(began) <= 0:
                raise LocalChainError("anvil did not write its --config-out file")
            time.sleep(0.005)
        config = json.loads(config_out.read_text(encoding="utf-8"))
        pairs = [
            DevAccount(to_checksum_address(addr), key)
            for addr, key in zip(config["available_accounts"], config["private_keys"], strict=True)
        ]
        if len(pairs) != self._n_accounts + 1:
            raise LocalChainError(f"anvil created {len(pairs)} accounts, expected more")
        self._accounts, self._harness = pairs[:-1], pairs[-1]

    def _install_usdc(self) -> None:
        artifact = load_artifact("TestUSDC")
        deployed = self.deploy("TestUSDC")
        runtime = self.rpc("eth_getCode", [deployed, "latest"])
        if runtime.lower() != artifact["deployedBytecode"].lower():
            raise LocalChainError("deployed TestUSDC runtime differs from the artifact")
        self.rpc("anvil_setCode", [CANONICAL_USDC, runtime])

    def stop(self) -> None:
        """Terminate anvil (then kill if it lingers) and release everything. Idempotent."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if self._stderr is not None:
                self._stderr.join(timeout=2)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def _output_tail(self) -> str:
        parts = []
        if self._stderr is not None and self._stderr.lines:
            parts.append("anvil stderr:\n" + self._stderr.text())
        stdout = self._log_text()
        if stdout:
            tail = "\n".join(stdout.splitlines()[-_TAIL_LINES:])
            parts.append("anvil stdout (tail):\n" + tail)
        return "\n".join(parts)

    def _log_text(self) -> str:
        try:
            return self._log_path.read_text("utf-8", "replace") if self._log_path else ""
        except FileNotFoundError:
            return ""

    def _death_report(self) -> str:
        assert self._proc is not None
        code = self._proc.wait()
        # Let the reader threads collect what anvil said before it died.
        if self._stderr is not None:
            self._stderr.join(timeout=1)
        return f"anvil exited with code {code} during start-up\n{self._output_tail()}"

    # ------------------------------------------------------------------ properties

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def port(self) -> int:
        if self._port is None:
            raise LocalChainError("LocalChain not started")
        return self._port

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def chain_id(self) -> int:
        return self._chain_id

    @property
    def usdc_address(self) -> str:
        return CANONICAL_USDC

    @property
    def accounts(self) -> list[DevAccount]:
        """Anvil's deterministic dev accounts (default mnemonic), minus the harness account."""
        return list(self._accounts)

    @property
    def harness_account(self) -> DevAccount:
        if self._harness is None:
            raise LocalChainError("LocalChain not started")
        return self._harness

    # ------------------------------------------------------------------ JSON-RPC

    def rpc(self, method: str, params: list[Any] | None = None) -> Any:
        if self._client is None:
            raise LocalChainError("LocalChain not started")
        with self._rpc_lock:
            self._rpc_id += 1
            request_id = self._rpc_id
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or []}
        response = self._client.post(self.rpc_url, json=body)
        response.raise_for_status()
        answer = response.json()
        error = answer.get("error")
        if error is not None:
            data = error.get("data")
            raise RpcError(
                method,
                int(error.get("code", 0)),
                str(error.get("message", "")),
                data if isinstance(data, str) else None,
            )
        return answer.get("result")

    def call(self, to: str, data: bytes, *, sender: str | None = None) -> bytes:
        """`eth_call` at the latest block; reverts raise RpcError with the revert data."""
        tx: dict[str, str] = {"to": to, "data": "0x" + data.hex()}
        if sender is not None:
            tx["from"] = sender
        result: str = self.rpc("eth_call", [tx, "latest"])
        return bytes.fromhex(result.removeprefix("0x"))

    def send(
        self,
        to: str | None,
        data: bytes = b"",
        *,
        sender: str | None = None,
        value: int = 0,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Send from an unlocked (or impersonated) account, the harness account by default, and
        wait for the receipt. Anvil mines a transaction even when gas estimation reverts, so a
        revert surfaces as TransactionReverted (with the reason from a call trace)."""
        tx: dict[str, str] = {
            "from": sender or self.harness_account.address,
            "data": "0x" + data.hex(),
            "value": hex(value),
        }
        if to is not None:
            tx["to"] = to
        tx_hash: str = self.rpc("eth_sendTransaction", [tx])
        receipt = self.wait_receipt(tx_hash, timeout=timeout)
        if int(receipt["status"], 16) != 1:
            raise self._reverted(tx_hash)
        return receipt

    def _reverted(self, tx_hash: str) -> TransactionReverted:
        try:
            trace = self.rpc("debug_traceTransaction", [tx_hash, {"tracer": "callTracer"}])
        except RpcError:
            return TransactionReverted(tx_hash, None, None)
        reason = trace.get("revertReason")
        output = trace.get("output")
        return TransactionReverted(
            tx_hash,
            reason if isinstance(reason, str) else None,
            output if isinstance(output, str) else None,
        )

    def wait_receipt(self, tx_hash: str, *, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            receipt: dict[str, Any] | None = self.rpc("eth_getTransactionReceipt", [tx_hash])
            if receipt is not None:
                return receipt
            if time.monotonic() >= deadline:
                raise LocalChainError(f"no receipt for {tx_hash} within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # ------------------------------------------------------------------ chain helpers

    def deploy(self, artifact_name: str, *args: Any) -> str:
        """Deploy a contract from `contracts-fixtures/artifacts/`; returns its address."""
        artifact = load_artifact(artifact_name)
        ctor = next((e for e in artifact["abi"] if e.get("type") == "constructor"), None)
        types = [i["type"] for i in ctor["inputs"]] if ctor else []
        if len(types) != len(args):
            raise LocalChainError(
                f"{artifact_name} constructor takes {len(types)} arguments, got {len(args)}"
            )
        code = bytes.fromhex(artifact["bytecode"].removeprefix("0x")) + encode(types, list(args))
        receipt = self.send(None, code)
        address: str = to_checksum_address(receipt["contractAddress"])
        return address

    def mint(self, address: str, amount: int) -> None:
        """Mint test USDC (atomic units) to `address`."""
        self.send(CANONICAL_USDC, encode_call("mint(address,uint256)", address, amount))

    def fund(self, address: str, usdc: int = 0, eth_wei: int = 0) -> None:
        """Add test USDC (atomic units) and ETH (wei) to `address`."""
        if eth_wei:
            current = self.eth_balance(address)
            self.rpc("anvil_setBalance", [address, hex(current + eth_wei)])
        if usdc:
            self.mint(address, usdc)

    def usdc_balance(self, address: str) -> int:
        raw = self.call(CANONICAL_USDC, encode_call("balanceOf(address)", address))
        (balance,) = decode(["uint256"], raw)
        return int(balance)

    def eth_balance(self, address: str) -> int:
        return int(self.rpc("eth_getBalance", [address, "latest"]), 16)

    def mine(self, blocks: int = 1) -> None:
        self.rpc("anvil_mine", [hex(blocks)])

    def increase_time(self, seconds: int) -> None:
        """Move the chain clock forward; takes effect in the next mined block."""
        self.rpc("evm_increaseTime", [seconds])

    def latest_timestamp(self) -> int:
        block = self.rpc("eth_getBlockByNumber", ["latest", False])
        return int(block["timestamp"], 16)
