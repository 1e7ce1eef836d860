"""BENCHMARKS.md's `## Headline (one GPU)` table and the Server-sweep picture, from one device call's JSONs.

    python3 bench/headline.py --engine engine.json --runs e2e_*.json --card "NVIDIA H200" \
        --command "bash bench/device_checks.sh round2" --png server_sweep.png

Inputs: `bench/bench_engine.py --compile --out` (the plain PyTorch fp16 DLRM forward and the same under
torch.compile, pairs/s at the largest batch) and `bench/bench_e2e.py --out` rows (Offline runs and Server
sweeps, each row with its `mlp` precision), all from the same device call. Profiles: the 99% profile
serves the fp8 top MLP, the 99.9% profile fp16 (what `gpu_mlp_precision = "auto"` picks where the
calibration measured fp8 below 99.9%, as on every model measured so far). Prints the markdown table;
writes the PNG (needs matplotlib, the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAIRS_PER_SAMPLE = 270.0  # REFERENCE: the mean LoadGen sample size of the reference size rule
NVIDIA = {"Offline": 745_480.0, "Server": 735_301.0}  # MLPerf v3.0, one H100-SXM (SPEC)
NVIDIA_SERVER_P99_MS = 8.2


@dataclass(frozen=True)
class Ceiling:
    """The physical ceiling of one pair on a Hopper GPU (H100/H200 SXM), from datasheet rates.

    Each stage fills the whole GPU (measured: no overlap between streams), so the stages add up:
    top-MLP FLOPs at the matrix rate of its precision, bottom-MLP FLOPs at the fp16 rate, and the bytes
    a pair must move (26 int8 rows of 128 B, 16 fp16 dense values in, one fp32 prediction out, its 26
    row ids) at the HBM bandwidth. The interaction (27 x 27 x 128 int8 MACs) is below 0.1 ns a pair."""

    hbm_bytes_per_s: float

    TOP_FLOP = 2 * (512 * 1024 + 1024 * 1024 + 1024 * 512 + 512 * 256 + 256)  # 479 padded to 512
    BOTTOM_FLOP = 2 * (16 * 512 + 512 * 256 + 256 * 128)
    BYTES = 26 * 128 + 16 * 2 + 4 + 26 * 4
    FP8_FLOP_S = 1979e12  # dense, H100/H200 SXM datasheet
    FP16_FLOP_S = 989e12

    def pairs_per_s(self, top_precision: str) -> float:
        top_rate = self.FP8_FLOP_S if top_precision == "fp8" else self.FP16_FLOP_S
        seconds = self.TOP_FLOP / top_rate + self.BOTTOM_FLOP / self.FP16_FLOP_S + self.BYTES / self.hbm_bytes_per_s
        return 1.0 / seconds


def hbm_of(card: str) -> float:
    return 4.8e12 if "H200" in card else 3.35e12  # datasheet HBM bandwidth (H200 / H100 SXM)


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for p in paths:
        data = json.loads(p.read_text())
        rows += [dict(r, source=p.name) for r in (data if isinstance(data, list) else [data]) if "error" not in r]
    return rows


def profile_of(mlp: str) -> str:
    return "99%" if mlp == "fp8" else "99.9%"


def headline(engine: dict[str, Any], rows: list[dict[str, Any]], card: str, command: str,
             duration_s: float) -> str:
    base = engine["baseline_pairs_per_s"]
    batch = max(base, key=lambda k: int(k))
    plain = float(base[batch])
    compiled = float(engine.get("compiled_pairs_per_s", {}).get(batch, float("nan")))
    ceiling = Ceiling(hbm_of(card))
    out = ["| scenario | profile (top MLP) | samples/s | pairs/s | p99 ms | LoadGen | x NVIDIA | share of ceiling "
           "| x plain PyTorch | x torch.compile |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for scenario in ("Offline", "Server"):
        for mlp in ("fp8", "fp16"):
            mine = [r for r in rows if r.get("scenario") == scenario and r.get("mlp") == mlp and r.get("gpu_part") == 1.0]
            if scenario == "Server":
                mine = [r for r in mine if r.get("result") == "VALID"]
            if not mine:
                continue
            best = max(mine, key=lambda r: float(r["samples_per_s"]))
            sps = float(best["samples_per_s"])
            pairs = sps * PAIRS_PER_SAMPLE if not best.get("pairs_per_s") else float(str(best["pairs_per_s"]).replace(",", ""))
            out.append(
                f"| {scenario} | {profile_of(mlp)} ({mlp}) | {sps:,.0f} | {pairs / 1e6:.1f} M | "
                f"{best['p99_ms'] if scenario == 'Server' else '-'} | "
                f"{best['result']} | {sps / NVIDIA[scenario]:.2f} | {pairs / ceiling.pairs_per_s(mlp):.0%} | "
                f"{pairs / plain:.1f} | {pairs / compiled:.1f} |")
    out.append("")
    out.append(f"GPU: {card}; runs of {duration_s:g} s (not MLPerf length); command: `{command}`. Baselines from the "
               f"same device call: plain PyTorch fp16 DLRM {plain / 1e6:.1f} M pairs/s, torch.compile "
               f"{compiled / 1e6:.1f} M pairs/s (forward alone at batch {batch}, data on the device). Ceiling "
               f"(datasheet rates, bench/headline.py `Ceiling`): {ceiling.pairs_per_s('fp8') / 1e6:.0f} M pairs/s "
               f"with an fp8 top MLP, {ceiling.pairs_per_s('fp16') / 1e6:.0f} M with fp16.")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], card: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mlp, color in (("fp8", "tab:blue"), ("fp16", "tab:orange")):
        sweep = sorted((r for r in rows if r.get("scenario") == "Server" and r.get("mlp") == mlp),
                       key=lambda r: float(r["target_qps"]))
        if not sweep:
            continue
        x = [float(r["target_qps"]) / 1e3 for r in sweep]
        label = f"{profile_of(mlp)} profile ({mlp} top MLP)"
        ax_rate.plot(x, [float(r["samples_per_s"]) / 1e3 for r in sweep], "o-", color=color, label=label)
        ax_p99.plot(x, [float(r["p99_ms"]) for r in sweep], "o-", color=color, label=label)
        for r, xi in zip(sweep, x):
            if r.get("result") != "VALID":
                ax_p99.annotate("INVALID", (xi, float(r["p99_ms"])), fontsize=7, color=color)
    ax_rate.plot([NVIDIA["Server"] / 1e3], [NVIDIA["Server"] / 1e3], "r*", markersize=14, label="NVIDIA v3.0, one H100")
    ax_p99.plot([NVIDIA["Server"] / 1e3], [NVIDIA_SERVER_P99_MS], "r*", markersize=14, label="NVIDIA v3.0, one H100")
    ax_p99.set_yscale("log")  # an INVALID point's seconds beside the 30 ms bound
    ax_p99.axhline(30, color="gray", linestyle="--", linewidth=1)
    ax_p99.text(ax_p99.get_xlim()[0], 33, "MLPerf bound 30 ms", fontsize=8, color="gray")
    ax_rate.set(xlabel="offered rate (k samples/s)", ylabel="completed (k samples/s)",
                title=f"Server sweep, one {card}")
    ax_p99.set(xlabel="offered rate (k samples/s)", ylabel="p99 latency (ms, log)", title="Server p99 latency")
    for ax in (ax_rate, ax_p99):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, required=True)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--card", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--duration-s", type=float, default=10)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    rows = load_rows(args.runs)
    print(headline(json.loads(args.engine.read_text()), rows, args.card, args.command, args.duration_s))
    if args.png:
        plot(rows, args.card, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
