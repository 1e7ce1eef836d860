#!/usr/bin/env bash
# The GPU-machine checks behind BENCHMARKS.md, run through the device tool from the repository root:
#   bash bench/device_checks.sh validate   # fresh-machine demo, first Server run after a start, GPU tests
#   bash bench/device_checks.sh e2e        # full-size Offline end to end: .before/ (an older tree) vs now
#   bash bench/device_checks.sh fp8        # the fp8 top MLP: its GPU tests, the engine bench (fp16 vs fp8)
  setsid nohup python3 -m prepare.cli synthetic --full-size --samples 204800 --out $FS > /tmp/fs.log 2>&1 &
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
  timeout 240 python3 bench/bench_engine.py --scale 0.05 --pairs 1000000 --parts 1.0 --mlp fp16,fp8 \
    --out "$OUT/bench_engine_fp8.json" 2>&1 | grep -E "stages|batch 262144|err|Error|error" | tail -12
  for _ in $(seq 120); do grep -q '^}\|error' /tmp/fs.log 2>/dev/null && break; sleep 5; done
  tail -3 /tmp/fs.log
  timeout 200 python3 -m prepare.cli calibrate --model $FS/artifact --dataset $FS/dataset --pairs 30000 2>&1 | tail -2
  ;;
perf)
  for mlp in fp16 fp8 fp16 fp8; do
    python3 bench/bench_e2e.py --artifact $FS/artifact --dataset $FS/dataset --mlp $mlp --target-qps 450000 \
      --duration-s 10 --out "$OUT/e2e_offline_${mlp}_$RANDOM.json" 2>&1 | tail -1
  done
  python3 bench/bench_e2e.py --artifact $FS/artifact --dataset $FS/dataset --mlp fp16 --scenario Server \
    --target-qps 280000,320000,350000 --duration-s 8 --out "$OUT/server_fp16.json" 2>&1 | tail -4
  python3 bench/bench_e2e.py --artifact $FS/artifact --dataset $FS/dataset --mlp fp8 --scenario Server \
    --target-qps 320000,360000,400000 --duration-s 8 --out "$OUT/server_fp8.json" 2>&1 | tail -4
  ;;
*)
  echo "usage: $0 validate|e2e|fp8|perf" >&2; exit 2 ;;
esac
