"""`make demo`: the product's main job on its embedded default, end to end.

1. Generate a small synthetic model and Criteo-format days (once; reused afterwards).
2. Count row frequencies over the training days, convert the checkpoint to the int8 artifact in
   frequency order, preprocess the test day into a dataset, and take the fp32 AUC as the reference.
3. Start `dlrm-daemon` (one engine per GPU where CUDA is present, else the CPU engine).
4. Drive it with `loadgen_driver`: a short Server performance run and an accuracy run.
5. Stop the daemon with SIGTERM and check that it exits cleanly.

Every step runs the same command a user would type, so the demo also checks the CLIs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and shows its output."""


def _run(step: str, args: list[str], capture: bool = False) -> str:
    print(f"\n== {step}\n$ {' '.join(args)}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(args, cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=None)
    if capture and proc.stdout:
        print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise DemoError(f"step '{step}' failed with exit code {proc.returncode}")
    return proc.stdout or ""


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _prepare(root: Path) -> tuple[Path, Path, float]:
    """Generate (once) and convert the synthetic model and data; return artifact, dataset, fp32 AUC."""
    syn, art, ds = root / "synthetic", root / "artifact", root / "dataset"
    auc_file = root / "fp32_auc.json"
    if not (syn / "manifest.json").exists():
        _run("generate a synthetic model and Criteo days", _py("prepare.cli", "synthetic", "--out", str(syn)))
    manifest = json.loads((syn / "manifest.json").read_text())
    train = [str(syn / name) for name in manifest["train_days"]]
    test = str(syn / manifest["test_day"])
    rows = ",".join(str(r) for r in manifest["table_rows"])
    freq = root / "row_frequencies.bin"
    if not freq.exists():
        _run("count row frequencies over the training days",
             _py("prepare.cli", "criteo", *train, "--table-rows", rows, "--count-frequencies-out", str(freq)))
    if not (art / "meta.json").exists():
        _run("convert the checkpoint to the int8 artifact (frequency order)",
             _py("prepare.cli", "model", "--checkpoint", str(syn / "model.pt"),
                 "--row-frequencies", str(freq), "--out", str(art)))
    if not (ds / "meta.json").exists():
        _run("preprocess the test day into a dataset",
             _py("prepare.cli", "criteo", test, "--model", str(art), "--out", str(ds)))
    if not auc_file.exists():
        out = _run("fp32 reference AUC (dlrm-prepare eval)",
                   _py("prepare.cli", "eval", "--dataset", str(ds), "--precision", "fp32",
                       "--checkpoint", str(syn / "model.pt")), capture=True)
        auc_file.write_text(json.dumps({"fp32_auc": _parse_auc(out)}))
    return art, ds, float(json.loads(auc_file.read_text())["fp32_auc"])


def _parse_auc(text: str) -> float:
    match = re.search(r"AUC[^0-9]*([0-9]*\.[0-9]+)", text)
    if not match:
        raise DemoError(f"no AUC in the output of dlrm-prepare eval:\n{text}")
    return float(match.group(1))


def _engines() -> list[str]:
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        count = 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def _start_daemon(art: Path, ds: Path, runtime: Path, engines: list[str]) -> subprocess.Popen[bytes]:
    args = _py("daemon.cli", "--runtime-dir", str(runtime), "--model", str(art),
               "--datasets", f"demo={ds}", "--engines", ",".join(engines))
    print(f"\n== start dlrm-daemon ({', '.join(engines)})\n$ {' '.join(args)}", flush=True)
    # Keep the caller's PYTHONPATH (packages installed with --target, as on the GPU machine) after ours.
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(args, cwd=REPO, env=env)
    from daemon.client import wait_until_serving
    from daemon.errors import ConnectionFailed

    try:
        wait_until_serving(f"ipc://{runtime}/dlrm.sock", timeout_s=300, proc=proc)
    except ConnectionFailed as err:
        proc.kill()
        raise DemoError(str(err)) from None
    return proc


def _stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    print("\n== stop dlrm-daemon (SIGTERM: drain, stop engines, remove shared memory)", flush=True)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise DemoError("dlrm-daemon did not stop within 120 s of SIGTERM") from None
    if code != 0:
        raise DemoError(f"dlrm-daemon exited with code {code} after SIGTERM")
    print("dlrm-daemon stopped cleanly (exit 0)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / "var" / "demo", help="work directory (reused)")
    parser.add_argument("--server-qps", type=float, default=None,
                        help="Server target samples/s (default: 20 on CPU, 20000 on GPU)")
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        art, ds, fp32_auc = _prepare(root)
        engines = _engines()
        on_gpu = engines[0].startswith("cuda")
        qps = args.server_qps or (20000.0 if on_gpu else 20.0)
        # A 270-pair sample alone takes ~25 ms on the 2-core CPU engine, so the 30 ms bound is for
        # GPUs; the CPU demo says so and uses a looser bound rather than report a foregone INVALID.
        # LoadGen's early stopping needs about 662 queries within the bound before it accepts a p99
        # (200 gave INVALID with every query on time): 700 queries take 35 s at 20 samples/s.
        server_extra = [] if on_gpu else ["--latency-ms", "250", "--min-query-count", "700"]
        runtime = Path(tempfile.mkdtemp(prefix="dlrm-demo-", dir="/tmp"))
        daemon = _start_daemon(art, ds, runtime, engines)
        endpoint = f"ipc://{runtime}/dlrm.sock"
        try:
            common = ["--dataset", str(ds), "--dataset-name", "demo", "--endpoint", endpoint, "--short"]
            _run("LoadGen Server run (short, not of MLPerf length)",
                 _py("loadgen_driver.cli", "--scenario", "Server", "--mode", "PerformanceOnly",
                     "--target-qps", str(qps), "--output-dir", str(root / "logs_server"), *common,
                     *server_extra))
            _run("LoadGen accuracy run (every sample of the test day)",
                 _py("loadgen_driver.cli", "--scenario", "Offline", "--mode", "AccuracyOnly",
                     "--fp32-auc", f"{fp32_auc:.6f}", "--output-dir", str(root / "logs_accuracy"), *common))
        finally:
            _stop_daemon(daemon)
    except DemoError as err:
        print(f"\nmake demo: FAILED: {err}", file=sys.stderr)
        return 1
    print(f"\nmake demo: done. LoadGen logs under {root}/logs_server and {root}/logs_accuracy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
