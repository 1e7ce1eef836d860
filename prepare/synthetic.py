"""`dlrm-prepare synthetic`: a DLRM model and Criteo-format data for when the real ones are absent.

Default mode writes, under `--out`:
  * `day_0 .. day_{D-2}`: training days (only used to count row frequencies), `day_{D-1}`: the test
    day, as Criteo TSV (label, 13 ints, 26 hex values; some fields empty, as in Criteo);
  * `model.pt`: a DLRM_Net-format checkpoint (bare state dict, torch.save) with the REFERENCE table sizes
    scaled by `--scale` and capped at `--max-rows` (default 20,000);
  * `manifest.json`: which file is what, the table sizes, and the planted AUC per day.

Categorical values follow a Zipf-like law per table (prepare/synthetic_gen.py); a value's hex maps back
to its row under the criteo pipeline's `int(hex, 16) % rows` rule (empty -> 0 -> row 0), so
`dlrm-prepare criteo --model` on these files reproduces exactly the ids the labels were drawn with.

Labels are planted: the generated DLRM (engines.model) runs on the generated features and each label
is drawn ~ Bernoulli(p). The last layer is calibrated so logits have std `--logit-std` (default 1.3)
and mean `--logit-mean` (default -1.1): the fp32 AUC lands near 0.79 (the real model: 0.80) and int8
effects are measurable. To keep generation fast on a CPU, the planted MLPs have a live core of
`--planted-width` hidden units (default 64); the other units of the full-width layers have zero
outgoing weights, so the saved full-width checkpoint computes exactly (up to float rounding) the
probabilities the labels were drawn from.
Embedding entries are Student-t (`--embedding-tail-df`, default 8) rather than Gaussian: the tails
set each table's int8 scale, so int8 costs a measurable ~0.04% of the AUC (Gaussian: ~0.01%).

`--full-size` writes an int8 artifact and a dataset directly instead (prepare/synthetic_fullsize.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from formats.model_config import DLRMConfig
from engines.model import load_dlrm_state_dict
from formats.auc import roc_auc
from prepare import synthetic_gen as gen

MANIFEST_FORMAT = "dlrm-synthetic"
CHECKPOINT = "model.pt"
MANIFEST = "manifest.json"
CHUNK_PAIRS = 32768  # fixed: the random streams (hence the bytes) depend on it
CALIBRATION_PAIRS = 4096
EMBEDDING_STD = 0.3  # dot products of two rows ~ N(0, 128 * 0.3**4) ~ unit scale


class SyntheticError(ValueError):
    """Bad options for `dlrm-prepare synthetic` (the message says which and why)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the REFERENCE table sizes")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="cap on rows per table (default 20000; none with --full-size; 0 = none)")
    parser.add_argument("--days", type=int, default=3, help="day files; the last one is the test day")
    parser.add_argument("--pairs-per-day", type=int, default=100_000)
    parser.add_argument("--zipf", type=float, default=1.1, help="skew exponent of the row laws")
    parser.add_argument("--planted-width", type=int, default=64,
                        help="live hidden units of the planted MLPs (0 = all)")
    parser.add_argument("--embedding-tail-df", type=float, default=8.0,
                        help="Student-t tail of the fp32 embedding entries (0 = Gaussian); 8 costs int8 "
                             "about 0.04%% of the AUC, 4 about 0.6%%")
    parser.add_argument("--logit-std", type=float, default=1.3)
    parser.add_argument("--logit-mean", type=float, default=-1.1, help="-1.1: about 27%% positives")
    parser.add_argument("--full-size", action="store_true",
                        help="write an int8 artifact + dataset directly (REFERENCE sizes: 24 GB + 9 GB)")
    parser.add_argument("--samples", type=int, default=204_800,
                        help="--full-size: LoadGen samples in the dataset")


def run(args: argparse.Namespace) -> int:
    try:
        if args.full_size:
            from prepare.synthetic_fullsize import generate_full_size
            cap = args.max_rows if args.max_rows else None
            config = _config(args.scale, cap)
            info = generate_full_size(args.out, config, seed=args.seed, samples=args.samples,
                                      alpha=args.zipf, planted_width=args.planted_width)
        else:
            cap = 20_000 if args.max_rows is None else (args.max_rows or None)
            info = generate(args.out, _config(args.scale, cap), seed=args.seed, days=args.days,
                            pairs_per_day=args.pairs_per_day, alpha=args.zipf,
                            planted_width=args.planted_width, logit_std=args.logit_std,
                            logit_mean=args.logit_mean, tail_df=args.embedding_tail_df)
    except (ValueError, OSError) as exc:  # SyntheticError and the formats' errors are ValueErrors
        print(f"dlrm-prepare synthetic: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in info.items() if k != "table_rows"}, indent=1))
    return 0


def _config(scale: float, cap: int | None) -> DLRMConfig:
    if not scale > 0:
        raise SyntheticError(f"--scale must be > 0, got {scale}")
    if cap is not None and cap < 1:
        raise SyntheticError(f"--max-rows must be >= 1, got {cap}")
    return DLRMConfig.mlperf().scaled(scale, cap)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if labels.min() == labels.max():
        return None
    return float(roc_auc(labels, scores))


def generate(out: Path, config: DLRMConfig, *, seed: int = 1, days: int = 3, pairs_per_day: int = 100_000,
             alpha: float = 1.1, planted_width: int = 64, logit_std: float = 1.3,
             logit_mean: float = -1.1, tail_df: float = 8.0) -> dict:
    """Write the day files, checkpoint and manifest; returns the manifest."""
    if days < 2:
        raise SyntheticError(f"--days must be >= 2 (training days + a test day), got {days}")
    if pairs_per_day < 1:
        raise SyntheticError(f"--pairs-per-day must be >= 1, got {pairs_per_day}")
    if tail_df != 0 and not tail_df > 2:
        raise SyntheticError(f"--embedding-tail-df must be 0 or > 2, got {tail_df}")
    if not logit_std > 0:
        raise SyntheticError(f"--logit-std must be > 0, got {logit_std}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # written last: a partial directory has none
    ss = np.random.SeedSequence(seed)
    model_ss, law_ss, calib_ss, *day_ss = ss.spawn(3 + days)

    law_rng = np.random.default_rng(law_ss)
    skews = gen.table_skews(law_rng, config.table_rows, alpha)
    law = gen.FeatureLaw.draw(law_rng)

    model_rng = np.random.default_rng(model_ss)
    emb = [gen.embedding_table(model_rng, r, config.embedding_dim, EMBEDDING_STD, tail_df)
           for r in config.table_rows]
    mlp = gen.planted_mlp(model_rng, config, planted_width)
    narrow = gen.narrow_config(config, planted_width)
    core_w = gen.narrow_view(mlp, narrow)
    core = planted_model(emb, core_w)  # shares core_w's arrays: calibration edits them in place
    last = calibrate_last_layer(core, core_w, np.random.default_rng(calib_ss), law, skews, logit_std,
                                logit_mean)
    for key in (last + ".weight", last + ".bias"):
        block = core_w[key]
        mlp[key][tuple(slice(0, s) for s in block.shape)] = block

    names = [f"day_{d}" for d in range(days)]
    stats = []
    for d, name in enumerate(names):
        rng = np.random.default_rng(day_ss[d])
        probs, labels = [], []
        with open(out / name, "wb") as f:
            for start in range(0, pairs_per_day, CHUNK_PAIRS):
                n = min(CHUNK_PAIRS, pairs_per_day - start)
                chunk = gen.draw_chunk(rng, n, law, skews)
                p = predict(core, chunk.dense, chunk.sparse)
                y = rng.random(n) < p
                f.write(gen.encode_tsv(y, chunk))
                probs.append(p)
                labels.append(y)
        p_all, y_all = np.concatenate(probs), np.concatenate(labels)
        stats.append({"file": name, "pairs": pairs_per_day, "positive_rate": float(y_all.mean()),
                      "planted_auc": _auc(y_all.astype(np.float32), p_all)})

    state = {f"emb_l.{t}.weight": torch.from_numpy(w) for t, w in enumerate(emb)}
    state.update({k: torch.from_numpy(v) for k, v in mlp.items()})
    torch.save(state, out / CHECKPOINT)

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "mode": "criteo-tsv",
        "seed": seed,
        "checkpoint": CHECKPOINT,
        "train_days": names[:-1],
        "test_day": names[-1],
        "days": stats,
        "table_rows": list(config.table_rows),
        "zipf_alpha": alpha,
        "planted_width": planted_width,
        "logit_std": logit_std,
        "logit_mean": logit_mean,
        "embedding_tail_df": tail_df,
        "labels": "Bernoulli(p) with p from the checkpoint's own forward (planted model)",
        "empty_categorical_row": 0,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def planted_model(emb: list[np.ndarray], core_w: dict[str, np.ndarray]) -> torch.nn.Module:
    """engines.model.DLRM of the planted core, sharing the numpy arrays (no copies)."""
    state = {f"emb_l.{t}.weight": torch.from_numpy(w) for t, w in enumerate(emb)}
    state.update({k: torch.from_numpy(v) for k, v in core_w.items()})
    return load_dlrm_state_dict(state)


def predict(model: torch.nn.Module, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy().astype(np.float64)


def calibrate_last_layer(model: torch.nn.Module, core_w: dict[str, np.ndarray], rng: np.random.Generator,
                         law: gen.FeatureLaw, skews: list[gen.TableSkew], logit_std: float,
                         logit_mean: float) -> str:
    """Rescale the output layer so the planted logits have the wanted mean and std; edits `core_w`
    in place (the arrays `model` runs on) and returns the layer's key prefix.

    The logit is read through the model's own sigmoid: with the output weights shrunk by `eps` the
    probabilities stay near 0.5, where logit(p) / eps recovers the pre-sigmoid value accurately.
    """
    key = max((k for k in core_w if k.startswith("top_l.")), key=lambda k: int(k.split(".")[1]))
    key = key.rsplit(".", 1)[0]
    w, b = core_w[key + ".weight"], core_w[key + ".bias"]
    eps = 1e-3
    original = w.copy()
    w *= eps
    b[:] = 0.0
    chunk = gen.draw_chunk(rng, CALIBRATION_PAIRS, law, skews)
    p = np.clip(predict(model, chunk.dense, chunk.sparse), 1e-12, 1 - 1e-12)
    z = np.log(p / (1.0 - p)) / eps
    std = float(z.std())
    if not (std > 0 and math.isfinite(std)):
        raise SyntheticError("planted model has constant logits; cannot calibrate (try another --seed)")
    factor = logit_std / std
    w[:] = original * np.float32(factor)
    b[:] = np.float32(logit_mean - float(z.mean()) * factor)
    return key
