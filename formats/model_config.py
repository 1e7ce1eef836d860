"""The model's shape (docs/REFERENCE.md "The model"): DLRM v1's table sizes and layer widths.

Pure Python (no numpy, no torch): every process reads it (the dispatcher checks ids against the table sizes;
engines build the model from it; the artifact and dataset formats record it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

NUM_TABLES = 26

# REFERENCE: Criteo Terabyte table sizes with the 40M index limit, in feature order.
MLPERF_TABLE_ROWS: tuple[int, ...] = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10, 2208,
    11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)


@dataclass(frozen=True)
class DLRMConfig:
    table_rows: tuple[int, ...]
    embedding_dim: int = 128
    dense_features: int = 13
    bottom_mlp: tuple[int, ...] = (512, 256, 128)
    top_mlp: tuple[int, ...] = (1024, 1024, 512, 256, 1)

    def __post_init__(self) -> None:
        if len(self.table_rows) == 0 or any(int(r) < 1 for r in self.table_rows):
            raise ValueError(f"table_rows must be positive, got {self.table_rows}")
        if self.bottom_mlp[-1] != self.embedding_dim:
            # The interaction stacks the bottom output with the embeddings: widths must agree.
            raise ValueError(
                f"bottom_mlp must end at embedding_dim {self.embedding_dim}, got {self.bottom_mlp}"
            )
        if self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end with 1 output, got {self.top_mlp}")

    @classmethod
    def mlperf(cls) -> "DLRMConfig":
        return cls(table_rows=MLPERF_TABLE_ROWS)

    def scaled(self, scale: float, cap: int | None = None) -> "DLRMConfig":
        """Same dims, each table's rows multiplied by `scale` (at least 1) and capped at `cap`."""
        rows = [max(1, int(math.ceil(r * scale))) for r in self.table_rows]
        if cap is not None:
            rows = [min(r, int(cap)) for r in rows]
        return replace(self, table_rows=tuple(rows))

    @property
    def num_tables(self) -> int:
        return len(self.table_rows)

    @property
    def total_rows(self) -> int:
        return int(sum(self.table_rows))

    @property
    def interaction_width(self) -> int:
        n = self.num_tables + 1
        return self.embedding_dim + n * (n - 1) // 2

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state-dict key of DLRM_Net with its shape."""
        shapes: dict[str, tuple[int, ...]] = {}
        for t, rows in enumerate(self.table_rows):
            shapes[f"emb_l.{t}.weight"] = (int(rows), self.embedding_dim)
        for prefix, widths, fan_in in (
            ("bot_l", self.bottom_mlp, self.dense_features),
            ("top_l", self.top_mlp, self.interaction_width),
        ):
            for i, out in enumerate(widths):
                shapes[f"{prefix}.{2 * i}.weight"] = (out, fan_in)
                shapes[f"{prefix}.{2 * i}.bias"] = (out,)
                fan_in = out
        return shapes

    def mlp_keys(self) -> list[str]:
        return [k for k in self.expected_shapes() if not k.startswith("emb_l.")]
