"""The stage probe's fp8 top-MLP measurements -> the engine's launch choices, kept with an artifact.

    python3 bench/stage_probe.py --stages top --out stages_top.json       # on the GPU the engine runs on
    python3 bench/write_kernel_tuning.py --probe stages_top.json [--artifact ARTIFACT]

Per fp8 layer, the fastest Triton launch that beat cuBLASLt's time for that layer (bench/stage_probe.py
times both, same process). They are kept only if the whole top MLP with them, in a CUDA graph, was faster
than the all-cuBLASLt chain in the same run (the probe's `triton_chain`). Prints the kernel_config
(JSON, one line: bench_engine.py --kernel-config takes it) and, with --artifact, writes it into the
artifact's kernel_tuning.json for the probe's card (formats/kernel_tuning.py), after checking that the
artifact's top-MLP widths are the ones the probe measured. Nothing qualifies: prints {} and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAUNCH_KEYS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "persistent")


def winners(probe: dict[str, Any]) -> dict[str, Any]:
    """{"fp8_linear": {layer: launch}} from a stage_probe.py JSON, or {} where Triton did not win."""
    top = probe["fp8_top"]
    per_layer = top["per_layer_ms"]
    chain = top.get("triton_chain", {}).get("graph_ms", {})
    if not chain or chain.get("triton_wins", float("inf")) >= chain.get("cublaslt", 0.0):
        return {}
    best: dict[int, dict[str, Any]] = {}
    for row in top.get("triton_linear", []):
        i = int(row["layer"])
        if row["ms"] < per_layer[i] and (i not in best or row["ms"] < best[i]["ms"]):
            best[i] = row
    if not best:
        return {}
    return {"fp8_linear": {str(i): {k: int(row.get(k, 0)) for k in LAUNCH_KEYS} for i, row in sorted(best.items())}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", type=Path, required=True, help="bench/stage_probe.py --stages top JSON")
    ap.add_argument("--artifact", type=Path, default=None, help="write the choices into its kernel_tuning.json")
    args = ap.parse_args()
    probe = json.loads(args.probe.read_text())
    config = winners(probe)
    print(json.dumps(config))
    if args.artifact is None or not config:
        return 0
    from formats.artifact import Artifact
    from formats.kernel_tuning import write_kernel_tuning

    widths = [int(w) for w in probe["fp8_top"]["widths"]]
    mlp = Artifact.open(args.artifact).mlp
    have = [int(mlp[f"top_l.{2 * i}.weight"].shape[0]) for i in range(len(widths))]
    if have != widths:
        print(f"not written: the artifact's top-MLP widths {have} are not the probe's {widths}", file=sys.stderr)
        return 1
    chain = probe["fp8_top"]["triton_chain"]["graph_ms"]
    measured = (f"bench/stage_probe.py on {probe['card']}: top MLP in a graph {chain['triton_wins']:.3f} ms "
                f"against all-cuBLASLt {chain['cublaslt']:.3f} ms at {probe['batch']} rows")
    file = write_kernel_tuning(args.artifact, probe["card"], config, measured)
    print(f"wrote {file} for {probe['card']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
