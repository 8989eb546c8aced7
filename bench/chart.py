"""The results chart (matplotlib PNG) and the Markdown table, both from one results JSON.

.venv/bin/python -m bench.chart bench/results/latest.json   # rewrites the PNG, prints the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OURS = "#1f77b4"
THEIRS = "#d62728"
CEILING = "#7f7f7f"


def write_chart(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_rps, ax_lat), (ax_ceil, ax_growth) = axes

    paid = results.get("paid", [])
    for server, color, label in (
        ("gateway", OURS, "x402-gateway"),
        ("official", THEIRS, "official x402 SDK (FastAPI)"),
    ):
        levels = sorted(
            (lv for lv in paid if lv["server"] == server), key=lambda lv: lv["concurrency"]
        )
        if not levels:
            continue
        conc = [lv["concurrency"] for lv in levels]
        ax_rps.plot(conc, [lv["rps"] for lv in levels], "o-", color=color, label=label)
        for lv in levels:
            ax_rps.annotate(
                f"{lv['rps']:.0f}",
                (lv["concurrency"], lv["rps"]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
        ax_lat.plot(conc, [lv["p50_ms"] for lv in levels], "o-", color=color, label=f"{label} p50")
        ax_lat.plot(conc, [lv["p99_ms"] for lv in levels], "s--", color=color, label=f"{label} p99")
    ax_rps.set(
        title="Paid requests/s to the 202 (Anvil, pre-signed)",
        xlabel="concurrent payers",
        ylabel="paid req/s",
        xscale="log",
        yscale="log",
    )
    ax_lat.set(
        title="Latency to the 202",
        xlabel="concurrent payers",
        ylabel="ms",
        xscale="log",
        yscale="log",
    )
    for ax in (ax_rps, ax_lat):
        ax.set_xticks([1, 8, 32], labels=["1", "8", "32"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)

    bars: list[tuple[str, float, float]] = []
    if "challenge" in results:
        ch = results["challenge"]
        bars.append(("402 challenge\n(unpaid req/s)", ch["gateway_rps"], ch["ceiling_rps"]))
    if "settlement" in results:
        st = results["settlement"]
        bars.append(("settlements/s", st["settler_per_s"], st["ceiling_per_s"]))
    if "verify" in results:
        vf = results["verify"]
        bars.append(("full verifies/s\n(one core)", vf["decode_match_verify_per_s"], 5000))
    xs = range(len(bars))
    ax_ceil.bar([x - 0.2 for x in xs], [b[1] for b in bars], 0.4, color=OURS, label="x402-gateway")
    ax_ceil.bar(
        [x + 0.2 for x in xs],
        [b[2] for b in bars],
        0.4,
        color=CEILING,
        label="ceiling (verify: the goal)",
    )
    for x, (_, ours, ceiling) in zip(xs, bars, strict=True):
        ax_ceil.annotate(f"{ours / ceiling:.2f}x", (x - 0.2, ours), ha="center", va="bottom")
    ax_ceil.set_xticks(list(xs), labels=[b[0] for b in bars])
    ax_ceil.set(title="Against the physical ceiling", ylabel="per second", yscale="log")
    ax_ceil.legend(fontsize=8)

    growth = results.get("growth", [])
    base = next((lv for lv in paid if lv["server"] == "gateway" and lv["concurrency"] == 32), None)
    points = ([base] if base else []) + growth
    if points:
        rows = [max(1, lv["ledger_rows"]) for lv in points]
        ax_growth.plot(rows, [lv["rps"] for lv in points], "o-", color=OURS, label="paid req/s")
        ax_growth.plot(rows, [lv["p50_ms"] for lv in points], "s--", color=CEILING, label="p50 ms")
        ax_growth.set(
            title="Cost of growth (c=32; 1 = empty ledger)",
            xlabel="rows already in the ledger",
            xscale="log",
            ylim=(0, None),
        )
        ax_growth.grid(True, alpha=0.3)
        ax_growth.legend(fontsize=8)

    m = results.get("machine", {})
    fig.suptitle(
        f"x402-gateway benchmarks, {results.get('started', '')}: {m.get('cpu', '?')}, "
        f"{m.get('cores', '?')} cores, Python {m.get('python', '?')}, {m.get('anvil', '')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(results: dict[str, Any]) -> str:
    """The README's table (Markdown)."""
    out = ["| benchmark | x402-gateway | reference | ratio | goal |", "|---|---|---|---|---|"]
    if "challenge" in results:
        ch = results["challenge"]
        out.append(
            f"| 402 challenge, unpaid req/s (c={ch['concurrency']}) | {ch['gateway_rps']:,} | "
            f"{ch['ceiling_rps']:,} (bare Starlette, static 402) | {ch['ratio']:.2f} | >= 0.8 |"
        )
    by = {(lv["server"], lv["concurrency"]): lv for lv in results.get("paid", [])}
    for c in (1, 8, 32):
        ours, sdk = by.get(("gateway", c)), by.get(("official", c))
        if ours and sdk:
            goal = ">= 10x" if c == 32 else ""
            out.append(
                f"| paid req/s, c={c} | {ours['rps']:,.0f} | {sdk['rps']:,.0f} (official SDK) | "
                f"{ours['rps'] / sdk['rps']:.1f}x | {goal} |"
            )
            goal = "<= 0.5" if c == 1 else ""
            out.append(
                f"| p50 / p99 ms, c={c} | {ours['p50_ms']:.1f} / {ours['p99_ms']:.1f} | "
                f"{sdk['p50_ms']:.1f} / {sdk['p99_ms']:.1f} | "
                f"{ours['p50_ms'] / sdk['p50_ms']:.2f} (p50) | {goal} |"
            )
    if ("gateway", 32) in by and ("official", 32) in by:
        ours, sdk = by[("gateway", 32)], by[("official", 32)]
        fo, fs = ours["free_request_under_load"], sdk["free_request_under_load"]
        out.append(
            f"| free request p99 ms under paid load, c=32 | {fo['p99_ms']:.1f} | "
            f"{fs['p99_ms']:.1f} | | |"
        )
        out.append(
            f"| server CPU ms per paid request, c=32 | {ours['server_cpu_ms_per_paid']:.2f} | "
            f"{sdk['server_cpu_ms_per_paid']:.2f} | | |"
        )
    if "verify" in results:
        vf = results["verify"]
        out.append(f"| signature recoveries/s, one core | {vf['recoveries_per_s']:,} | | | |")
        out.append(
            f"| full off-chain verifies/s, one core (decode+match+verify) | "
            f"{vf['decode_match_verify_per_s']:,} | 5,000 (goal) | {vf['ratio']:.1f}x | >= 5,000 |"
        )
    if "settlement" in results:
        st = results["settlement"]
        out.append(
            f"| settlements/s (c={st['concurrency']}, {st['count']} tx) | "
            f"{st['settler_per_s']:,.0f} | {st['ceiling_per_s']:,.0f} (raw pre-signed txs) | "
            f"{st['ratio']:.2f} | >= 0.5 |"
        )
    for lv in results.get("growth", []):
        out.append(
            f"| paid req/s, c=32, {lv['ledger_rows']:,} ledger rows | {lv['rps']:,.0f} "
            f"(p50 {lv['p50_ms']:.0f} ms) | | | flat |"
        )
    if "memory" in results:
        mem = results["memory"]
        out.append(
            f"| gateway peak RSS, {mem['concurrency']} concurrent payers | "
            f"{mem['server_peak_rss_mb']:.0f} MB ({mem['rps']:,.0f} paid req/s) | | | ~200 MB |"
        )
    return "\n".join(out)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results/latest.json")
    results = json.loads(path.read_text())
    print(write_chart(results, path.with_suffix(".png")))
    print(table(results))


if __name__ == "__main__":
    main()
