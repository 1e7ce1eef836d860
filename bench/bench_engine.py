"""GpuBackend throughput on the GPU, beside a plain PyTorch fp16 DLRM forward measured in the same run.

Builds (on the device machine) a random int8 artifact with MLPerf table sizes scaled by --scale, rows in
frequency order for Zipf-skewed ids (REFERENCE hot/cold rule: per-table probabilities, sorted globally), and a
dataset of --pairs pairs with such ids. Then, per gpu_part (1.0, 0.5, 0.3, 0.1): load time, share of
lookups served from device memory, the captured forward alone (graph replay) and whole infer_by_ref /
infer_by_value calls (index gather, forward, predictions back to the host) at several batch sizes.
Baseline: engines.model.DLRM in fp16 on the device (per-table embedding lookups, eager), same batches.
Correctness: engine vs engines.reference.Int8Reference on 2,000 pairs.

Run on the device machine: `python3 bench/bench_engine.py --out $OUT/engine.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gather import bench_ms as cuda_ms, bounded_zipf  # noqa: E402
from engines.gpu_backend import GpuBackend  # noqa: E402
from kernels.pair_rows import remap_ids  # noqa: E402
from engines.model import DLRM, random_state_dict  # noqa: E402
from formats.model_config import DLRMConfig  # noqa: E402
from engines.reference import Int8Reference  # noqa: E402
from formats.artifact import Artifact, table_offsets, write_artifact  # noqa: E402
from formats.dataset import write_dataset  # noqa: E402


def zipf_ids(rng: np.random.Generator, n: int, rows: np.ndarray, a: float) -> np.ndarray:
    return bounded_zipf(rng, a, rows[None, :], (n, len(rows))).astype(np.int32)


def frequency_row_order(rows: np.ndarray, a: float) -> np.ndarray:
    """Global rows sorted by per-table probability of a Zipf(a) id, most likely first."""
    offs = table_offsets(rows)
    logp = np.empty(int(offs[-1]), dtype=np.float64)
    for t, r in enumerate(rows):
        k = np.arange(1, int(r) + 1, dtype=np.float64)
        w = -a * np.log(k)
        logp[offs[t] : offs[t + 1]] = w - np.log(np.exp(w - w.max()).sum()) - w.max()
    return np.argsort(-logp, kind="stable").astype(np.int32)


def build(root: Path, scale: float, pairs: int, a: float, seed: int) -> tuple[Path, Path, DLRMConfig, dict]:
    config = DLRMConfig.mlperf().scaled(scale)
    rows = np.asarray(config.table_rows)
    rng = np.random.default_rng(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    mlp_state = _mlp_state(config, seed)

    def tables():
        for t, r in enumerate(rows):
            q = torch.empty((int(r), config.embedding_dim), dtype=torch.int8, device=dev)
            q.random_(-127, 128, generator=gen)
            yield t, q.cpu().numpy()

    scales = (rng.random(config.num_tables) * 0.02 + 0.002).astype(np.float32)
    art = root / "artifact"
    t0 = time.perf_counter()
    write_artifact(art, config, tables(), scales, mlp_state, row_order=frequency_row_order(rows, a))
    t_art = time.perf_counter() - t0
    dense = np.log1p(rng.exponential(5.0, (pairs, config.dense_features))).astype(np.float32)
    sparse = zipf_ids(rng, pairs, rows, a)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(100, 701, pairs // 100))])
    offsets = np.append(offsets[offsets < pairs], pairs).astype(np.int64)
    ds = root / "dataset"
    write_dataset(ds, (rng.random(pairs) < 0.25).astype(np.float32), dense, sparse, offsets, config.table_rows,
                  "bench")
    return art, ds, config, {"artifact_s": t_art, "offsets": offsets, "dense": dense, "sparse": sparse}


def _mlp_state(config: DLRMConfig, seed: int) -> dict[str, np.ndarray]:
    tiny = DLRMConfig(tuple(1 for _ in config.table_rows), config.embedding_dim, config.dense_features,
                      config.bottom_mlp, config.top_mlp)
    return {k: v.numpy() for k, v in random_state_dict(tiny, seed).items() if not k.startswith("emb_l.")}


def wall_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def baseline_model(art: Artifact) -> DLRM:
    """engines.model.DLRM in fp16 on the device with the artifact's dequantized tables."""
    cfg = art.config
    model = DLRM(cfg, device="meta")
    emb = torch.from_numpy(np.asarray(art.embeddings)).cuda()
    pos = torch.from_numpy(np.asarray(art.row_position)).cuda().long()
    state = {}
    for t in range(cfg.num_tables):
        a, b = int(art.table_offsets[t]), int(art.table_offsets[t + 1])
        state[f"emb_l.{t}.weight"] = (emb[pos[a:b]].float() * float(art.scales[t])).half()
    for k, v in art.mlp.items():
        state[k] = torch.from_numpy(np.asarray(v)).cuda().half()
    model.load_state_dict(state, assign=True)
    return model.eval()


def pipelined_pairs_per_s(eng: GpuBackend, starts: np.ndarray, counts: np.ndarray, region: np.ndarray,
                          reps: int = 40) -> float:
    """By-reference batches kept `eng.inflight` deep (as the engine process does), predictions written
    by DMA into page-locked host memory (`region`, registered when the engine was made, as the engine
    process registers its shared-memory slots): pairs/s."""
    from collections import deque

    n = int(counts.sum())
    depth = eng.inflight
    outs = region[: depth * n].reshape(depth, n)
    pend: deque = deque()
    for warm in (True, False):
        t0 = time.perf_counter()
        for i in range(4 if warm else reps):
            if len(pend) >= depth:
                pend.popleft().wait()
            pend.append(eng.submit_by_ref("bench", starts, counts, outs[i % depth]))
        while pend:
            pend.popleft().wait()
    return reps * n / (time.perf_counter() - t0)


def stage_breakdown(eng: GpuBackend, n: int) -> dict[str, float]:
    """Milliseconds of each stage of one eager forward at batch n (for docs/GPU_NOTES.md)."""
    from kernels.dot_interaction import dot_interaction
    from kernels.embedding_gather import embedding_gather
    from kernels.gather_interaction import gather_interaction

    from kernels.bottom_mlp import bottom_mlp

    x = eng.dense_in[:n]
    def bottom() -> torch.Tensor:
        if eng.fused_bottom:
            return bottom_mlp(x, eng.bottom, eng.bottom_out[:n])
        y = x
        for w, b in eng.bottom:
            y = eng._linear_relu(y, w, b)
        return y
    bo = bottom()
    emb = (eng.emb_buf[:n] if eng.emb_buf is not None else
           torch.empty((n, eng.config.num_tables, eng.config.embedding_dim), dtype=eng.dtype, device=eng.pred.device))
    inter_out = (eng.top_in[:n] if eng.top_in.dtype == bo.dtype else
                 torch.empty(eng.top_in[:n].shape, dtype=bo.dtype, device=bo.device))
    def top() -> torch.Tensor:
        y = eng.top_in[:n]
        if eng.fp8 is not None:
            eng.fp8.forward(y, eng.pred, torch.cuda.current_stream())
            return eng.pred
        if eng.qtop is not None:
            from engines.int8_top_mlp import top_mlp_int8

            return top_mlp_int8(eng.qtop, y, eng.pred[:n], eng.top_scratch, eng.top_configs)
        for i, (w, b) in enumerate(eng.top):
            y = eng._linear_relu(y, w, b) if i < len(eng.top) - 1 else torch.nn.functional.linear(y, w, b)
        return y
    return {
        "bottom_mlp": cuda_ms(bottom),
        # sparse_in holds file positions (remapped before the graph): row_position None
        "gather": cuda_ms(lambda: embedding_gather(eng.sparse_in[:n], eng.table_offsets, None,
                                                   eng.scales, eng.hot, eng.cold, emb)),
        # the unfused kernel writes fp16 (the fp8 engine's top input is e4m3: time it into a scratch tensor)
        "interaction": cuda_ms(lambda: dot_interaction(bo, emb, inter_out)),
        "fused_gather_interaction": cuda_ms(lambda: gather_interaction(
            bo, eng.sparse_in[:n], eng.table_offsets, None, eng.scales, eng.hot, eng.cold,
            eng.top_in[:n], **eng.gather_launch_config,
            out_scale=eng._top_in_inv_scale if eng.fp8 is not None else None)),
        "top_mlp": cuda_ms(top),
        "graph_forward": cuda_ms(lambda: eng._run(n)),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument("--max-batch", type=int, default=262_144)
    ap.add_argument("--parts", type=str, default="1.0,0.5,0.3,0.1")
    ap.add_argument("--kernel-from", type=Path, default=None,
                    help="bench_gather.py JSON: use its fastest fused gather+interaction variant")
    ap.add_argument("--kernel-config", default=None,
                    help='JSON merged into the engines\' kernel_config, e.g. \'{"stage_cold_rows": 1048576}\'')
    ap.add_argument("--mlp", default="fp16,int8", help="MLP precisions to time (GpuBackend mlp_precision)")
    ap.add_argument("--unfused", action="store_true", help="also time v1's unfused kernels and separate ReLU")
    ap.add_argument("--batches", default="2048,8192,32768,131072,262144", help="batch sizes timed (pairs)")
    ap.add_argument("--compile", action="store_true", help="also time the baseline under torch.compile")
    ap.add_argument("--before", action="store_true",
                    help="also time each MLP precision with the kernels before issue 13's round 2 (the fp16-row "
                         "Gram in gather_interaction, cuBLAS bottom MLP)")
    ap.add_argument("--cold-gather", default="kernel",
                    help="for gpu_parts below 1 (after the first part): cold_gather values to time, comma-separated "
                         "(kernel: the fused gather reads host rows zero-copy; host: engines/cold_rows.py)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    res: dict = {"card": card, "args": {k: str(v) for k, v in vars(args).items()}}
    kcfg = None
    if args.kernel_from is not None and args.kernel_from.is_file():
        f = min(json.loads(args.kernel_from.read_text())["fused"], key=lambda v: v["ms"])
        kcfg = {"pairs_per_program": f["per_program"], "pairs_per_tile": f["tile"], "num_warps": f["warps"]}
    if args.kernel_config:
        kcfg = {**(kcfg or {}), **json.loads(args.kernel_config)}
    res["kernel_config"] = kcfg
    print("fused kernel config:", kcfg or "backend default", flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    art_path, ds_path, config, extra = build(root, args.scale, args.pairs, args.zipf, 7)
    res["artifact_s"] = extra["artifact_s"]
    res["total_rows"] = config.total_rows
    print(f"{card}: artifact {config.total_rows} rows ({config.total_rows * 128 / 1e9:.2f} GB int8) "
          f"built in {extra['artifact_s']:.1f} s", flush=True)
    dense, sparse, offsets = extra["dense"], extra["sparse"], extra["offsets"]
    art = Artifact.open(art_path)
    batches = [b for b in (int(x) for x in args.batches.split(",")) if b <= args.max_batch]

    # Baseline first: the same batches through the fp16 PyTorch module.
    model = baseline_model(art)
    base = {}
    with torch.no_grad():
        dd = torch.from_numpy(dense).cuda()
        ss = torch.from_numpy(sparse).cuda()
        for b in batches:
            ms = cuda_ms(lambda b=b: model(dd[:b].half(), ss[:b]), reps=10)
            base[b] = b / ms * 1e3
            print(f"  baseline fp16 DLRM forward batch {b}: {ms:.3f} ms  {base[b] / 1e6:.2f} M pairs/s", flush=True)
        p_base = model(dd[:2000].half(), ss[:2000]).float().cpu().numpy()
    del dd, ss
    torch.cuda.empty_cache()
    res["baseline_pairs_per_s"] = base

    ref = Int8Reference(art, 1.0).predict(dense[:2000], sparse[:2000])
    mlps = args.mlp.split(",")
    ref_int8 = ref_fp8 = None
    if "int8" in mlps or "fp8" in mlps:
        # Static activation scales from the first pairs (a random model: accuracy is not the point here).
        from prepare.calibrate import calibrate
        from engines.reference import Int8MlpReference
        from formats.artifact import write_calibration
        from formats.dataset import Dataset

        from engines.reference import Fp8MlpReference

        write_calibration(art_path, calibrate(art, Dataset.open(ds_path), 16384))
        ref_int8 = Int8MlpReference(Artifact.open(art_path), 1.0).predict(dense[:2000], sparse[:2000])
        ref_fp8 = Fp8MlpReference(Artifact.open(art_path), 1.0).predict(dense[:2000], sparse[:2000])
    parts = [float(p) for p in args.parts.split(",")]
    # (gpu_part, fused ReLU epilogue, fused gather+interaction, MLP precision)
    # (gpu_part, fused ReLU epilogue, fused gather+interaction, MLP precision, kernels before round 2)
    configs = ([(parts[0], True, True, m, old, "kernel") for m in mlps
                for old in ((True, False) if args.before else (False,))]
               + ([(parts[0], True, False, mlps[0], False, "kernel"), (parts[0], False, False, mlps[0], False, "kernel")]
                  if args.unfused else [])
               + [(p, True, True, mlps[-1], False, cg) for p in parts[1:] for cg in args.cold_gather.split(",")])
    rows = []
    for config_i, (part, fused, fgather, mlp, before, cold_gather) in enumerate(configs):
        t0 = time.perf_counter()
        sizes = None if config_i == 0 else [b for b in batches]
        eng = GpuBackend("cuda:0", art_path, part, max_batch_pairs=args.max_batch, graph_sizes=sizes,
                         fused_relu=fused, fused_gather=fgather, mlp_precision=mlp,
                         kernel_config={**(kcfg or {}), "gram": "half"} if before else kcfg, fused_bottom=not before,
                         cold_gather=cold_gather)
        load_s = time.perf_counter() - t0
        region = np.zeros(eng.inflight * args.max_batch, dtype=np.float32)  # as the engine's slots
        eng.pin_host_memory(region)
        t0 = time.perf_counter()
        eng.register_dataset("bench", ds_path)
        reg_s = time.perf_counter() - t0
        out = np.full(args.pairs, np.nan, dtype=np.float32)
        st = eng.infer_by_value(dense[:2000], sparse[:2000], out)
        want = ref_int8 if mlp == "int8" else ref_fp8 if mlp == "fp8" else ref
        err = float(np.abs(out[:2000] - want).max())
        err_base = float(np.abs(p_base - ref).max())
        entry = {"gpu_part": part, "fused_relu": fused, "fused_gather": fgather, "mlp": mlp, "before": before,
                 "cold_gather": cold_gather,
                 "load_s": load_s,
                 "register_s": reg_s, "times": vars(eng.times), "max_abs_err_vs_reference": err,
                 "max_abs_err_int8_mlp_vs_fp32_mlp": float(np.abs(out[:2000] - ref).max()),
                 "baseline_max_abs_err": err_base, "device_bytes": eng.device_memory_bytes(), "by_batch": {}}
        st = eng.infer_by_ref("bench", np.array([0]), np.array([args.pairs]), out)
        entry["hot_share"] = st.hot_lookups / (st.hot_lookups + st.cold_lookups)
        print(f"gpu_part {part}: load {load_s:.2f} s ({eng.times.hot_s:.2f} hot, {eng.times.cold_s:.2f} cold, "
              f"{eng.times.graphs_s:.2f} graphs), HBM share {entry['hot_share']:.4f}, err {err:.2e} "
              f"(fp16 baseline {err_base:.2e})", flush=True)
        for b in batches:
            # whole samples: ranges of the dataset's sample partition adding up to about b pairs
            s_end = int(np.searchsorted(offsets, b, side="right")) - 1  # whole samples, <= b pairs
            starts, counts = offsets[:s_end], np.diff(offsets[: s_end + 1])
            n = int(counts.sum())
            eng.dense_in[:b, : dense.shape[1]].copy_(torch.from_numpy(dense[:b]).cuda())
            remap_ids(torch.from_numpy(sparse[:b]).cuda(), eng.table_offsets, eng.row_position, eng.sparse_in[:b],
                      torch.zeros(1, dtype=torch.int64, device="cuda"))
            torch.cuda.synchronize()
            with torch.cuda.stream(eng.stream):
                fwd_ms = cuda_ms(lambda b=b: eng._run(b), reps=20)
            ref_ms = wall_ms(lambda: eng.infer_by_ref("bench", starts, counts, out))
            piped = pipelined_pairs_per_s(eng, starts, counts, region)
            val_ms = wall_ms(lambda b=b: eng.infer_by_value(dense[:b], sparse[:b], out), reps=5)
            entry["by_batch"][b] = {"forward_pairs_per_s": b / fwd_ms * 1e3, "by_ref_pairs_per_s": n / ref_ms * 1e3,
                                    "by_value_pairs_per_s": b / val_ms * 1e3, "by_ref_pairs": n,
                                    "pipelined_by_ref_pairs_per_s": piped}
            print(f"  batch {b}: graph forward {b / fwd_ms / 1e3:.2f} M pairs/s; infer_by_ref ({n} pairs) "
                  f"{n / ref_ms / 1e3:.2f} M/s; pipelined by_ref {piped / 1e6:.2f} M/s; infer_by_value {b / val_ms / 1e3:.2f} M/s", flush=True)
        if fused and fgather and part == parts[0]:
            with torch.cuda.stream(eng.stream):
                entry["stages_ms"] = stage_breakdown(eng, batches[-1])
            print("  stages at batch", batches[-1], {k: round(v, 3) for k, v in entry["stages_ms"].items()}, flush=True)
        eng.close()
        del eng
        torch.cuda.empty_cache()
        rows.append(entry)
        res["engine"] = rows
        if args.out:  # as it goes: a run cut short keeps what it measured
            args.out.write_text(json.dumps(res, indent=1, default=str))
    res["engine"] = rows
    if args.compile:
        # The baseline module under torch.compile (Inductor, default mode), at the largest batch only (each
        # batch size is its own compile); last, so that a long compile cannot cost the engine figures.
        b = batches[-1]
        dd = torch.from_numpy(dense[:b]).cuda().half()
        ss = torch.from_numpy(sparse[:b]).cuda()
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled = torch.compile(model, dynamic=False)
            compiled(dd, ss)
            torch.cuda.synchronize()
            res["compile_s"] = time.perf_counter() - t0
            ms = cuda_ms(lambda: compiled(dd, ss), reps=10)
        res["compiled_pairs_per_s"] = {b: b / ms * 1e3}
        print(f"  torch.compile fp16 DLRM forward batch {b}: {ms:.3f} ms  {b / ms / 1e3:.2f} M pairs/s "
              f"(compiled in {res['compile_s']:.0f} s; plain {base[b] / 1e6:.2f} M pairs/s)", flush=True)

    print(f"\n== engine summary ({card}; {config.total_rows * 128 / 1e9:.2f} GB int8 tables, Zipf {args.zipf}) ==")
    print("gpu_part  mlp   kernels cold   fusedReLU fusedGather HBM-share  load_s  batch   fwd Mpairs/s  by_ref M/s  pipelined M/s  by_value M/s  fp16-baseline M/s")
    for e in rows:
        for b, v in e["by_batch"].items():
            print(f"{e['gpu_part']:8.1f}  {e['mlp']:5s} {'before' if e['before'] else 'now':7s} {e['cold_gather']:6s} {str(e['fused_relu']):9s} {str(e['fused_gather']):11s} {e['hot_share']:9.4f}  {e['load_s']:6.2f}  {b:6d}  "
                  f"{v['forward_pairs_per_s'] / 1e6:12.2f}  {v['by_ref_pairs_per_s'] / 1e6:10.2f}  "
                  f"{v['pipelined_by_ref_pairs_per_s'] / 1e6:13.2f}  "
                  f"{v['by_value_pairs_per_s'] / 1e6:12.2f}  {base[b] / 1e6:17.2f}")
    print("max |engine - its reference| per config:", [f"{e['mlp']}@{e['gpu_part']}: {e['max_abs_err_vs_reference']:.2e}"
                                                        for e in rows])
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
