#!/usr/bin/env bash
# The daemon's SystemCallFilter= derived and shown (issue 14, item 9), on the machine it runs on:
#   bash bench/syscall_check.sh ARTIFACT DATASET ENGINE [MLP] [OUTDIR]
# 1. audit: dlrm-daemon (ENGINE, e.g. cuda:0 or cpu) under a seccomp filter that allows systemd's
#    @system-service and reports every other call (bench/syscall_audit.py), serving a LoadGen Offline
#    and a Server run, a metrics scrape, then stopped with SIGTERM;
# 2. enforce: the same under the filter as systemd applies it (an unlisted call kills the process),
#    allowing @system-service plus what step 1 found. Both runs must end VALID with daemon exit 0.
set -uo pipefail
ART=$1; DS=$2; ENGINE=$3; MLP=${4:-fp16}; OUTDIR=${5:-${OUT:-/tmp/out}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}

serve_under() {  # $1 mode, $2 extra calls: the daemon under the filter, LoadGen against it, SIGTERM
  local mode=$1 extra=$2 rt port
  rt=$(mktemp -d /tmp/dlrmsc-XXXX)
  port=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
  $PY bench/syscall_audit.py "$mode" --extra "$extra" --json "$OUTDIR/syscalls_$mode.json" --pid-file "$rt/pid" -- \
    $PY -m daemon.cli --runtime-dir "$rt" --model "$ART" --datasets sc="$DS" --engines "$ENGINE" \
    --gpu-mlp-precision "$MLP" --accuracy-target none --metrics-port "$port" --log-level WARNING \
    > "$OUTDIR/syscalls_$mode.log" 2>&1 &
  local wrapper=$!
  if ! $PY -c "from wire.client import wait_until_serving as w; w('ipc://$rt/dlrm.sock', 300)"; then
    echo "$mode: the daemon did not serve"; tail -5 "$OUTDIR/syscalls_$mode.log"; kill $wrapper; return 1
  fi
  for scenario in Offline Server; do
    timeout 120 $PY -m loadgen_driver.cli --scenario $scenario --target-qps "${QPS:-2000}" --short --quiet \
      --dataset "$DS" --dataset-name sc --endpoint "ipc://$rt/dlrm.sock" --output-dir "$rt/lg_$scenario" 2>&1 \
      | grep -E "^(result|throughput|driver):" | sed "s/^/$mode $scenario: /"
  done
  $PY -c "import urllib.request as u; t=u.urlopen('http://127.0.0.1:$port/metrics').read().decode(); \
print('$mode metrics:', sum(1 for l in t.splitlines() if l.startswith('dlrm_')), 'dlrm_ samples')"
  kill -TERM "$(cat "$rt/pid")"  # the daemon (the wrapper waits for it and reports)
  wait $wrapper; local code=$?
  echo "$mode: daemon exit $code"
  grep -A40 "system calls outside" "$OUTDIR/syscalls_$mode.log" | grep -E "^ |==" || true
  return $code
}

serve_under audit ""
extra=$($PY -c "import json; print(','.join(sorted(json.load(open('$OUTDIR/syscalls_audit.json'))['outside'])))")
echo "derived extra calls: ${extra:-none}"
serve_under enforce "$extra"
