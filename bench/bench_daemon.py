"""dlrm-daemon in a subprocess for a benchmark: its own runtime directory and config, started on entry,
SIGTERMed (and waited for) on exit. The settings are a full-size GPU benchmark's: large query and queue
bounds (LoadGen Offline issues everything at once), a patient heartbeat, `accuracy_target = "none"`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[1]


class BenchDaemon:
    def __init__(self, prefix: str, artifact: Path, dataset: Path, engines: str, mlp: str,
                 max_batch_pairs: int = 262144, inflight_batches: int = 4, extra: str = "") -> None:
        """`engines`: comma list (cuda:0,cuda:0); `extra`: more TOML lines (before the [datasets] table)."""
        self.rt = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.config = self.rt / "daemon.toml"
        quoted = ", ".join(f'"{e}"' for e in engines.split(","))
        self.config.write_text(
            f'runtime_dir = "{self.rt}"\nmodel = "{artifact}"\nengines = [{quoted}]\n'
            f'max_batch_pairs = {max_batch_pairs}\ninflight_batches = {inflight_batches}\n'
            f'max_pairs_per_query = 2000000\nmax_queue_pairs = 16000000\nheartbeat_timeout_s = 10.0\n'
            f'gpu_mlp_precision = "{mlp}"\naccuracy_target = "none"\n{extra}'
            f'[datasets]\nbench = "{dataset}"\n')
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.endpoint = f"ipc://{self.rt}/dlrm.sock"
        self.log_path = self.rt / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def __enter__(self) -> "BenchDaemon":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(self.config)], cwd=ROOT,
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.exit_code = self.proc.wait(120)
        self._log.close()

    def server_run(self, dataset: Path, target_qps: float, duration_s: float, latency_ms: float = 30.0) -> "ServerRun":
        """`loadgen_driver --scenario Server` against this daemon, started (not waited for)."""
        out_dir = self.rt / f"loadgen-{target_qps:g}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "loadgen_driver.cli", "--scenario", "Server", "--mode", "PerformanceOnly",
             "--dataset", str(dataset), "--dataset-name", "bench", "--endpoint", self.endpoint, "--target-qps",
             f"{target_qps:g}", "--latency-ms", f"{latency_ms:g}", "--min-duration-s", str(duration_s),
             "--min-query-count", "1", "--output-dir", str(out_dir), "--quiet"],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return ServerRun(proc, out_dir, duration_s)


class ServerRun:
    def __init__(self, proc: "subprocess.Popen[str]", out_dir: Path, duration_s: float) -> None:
        self.proc, self.out_dir, self.duration_s = proc, out_dir, duration_s

    def result(self) -> dict[str, object]:
        """Wait for the driver: LoadGen's verdict, completed rate, p99 and the driver's failed samples."""
        import re

        from loadgen_driver.summary import read_summary

        out, err = self.proc.communicate(timeout=self.duration_s * 4 + 120)
        print(out[-1500:], err[-1500:], sep="\n", flush=True)
        summary = read_summary(self.out_dir)
        p99 = summary.number("99.00 percentile latency (ns)")
        errors = re.search(r"errors: ([\d,]+) samples", out)
        return {"result": summary.result, "p99_ms": None if p99 is None else round(p99 / 1e6, 2),
                "completed_samples_per_s": float(summary.values.get("Completed samples per second", "nan")),
                "error_samples": int(errors.group(1).replace(",", "")) if errors else None,
                "driver_rc": self.proc.returncode}
