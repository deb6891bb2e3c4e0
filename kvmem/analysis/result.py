"""The return type of every analysis: named DataFrames plus the settings their numbers depend on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class AnalysisResult:
    """``tables[name]`` are DataFrames (written as ``analysis/{measure}_{name}.parquet``); ``meta``
    holds what every number depends on: thresholds, token counts, baselines, definitions."""

    measure: str
    tables: dict[str, pd.DataFrame]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    def to_dict(self) -> dict:
        return {"measure": self.measure, "meta": self.meta,
                "tables": {k: v.to_dict(orient="records") for k, v in self.tables.items()}}

    def write(self, folder: Path) -> list[Path]:
        from kvmem.atomic import write_parquet

        paths = []
        for name, df in self.tables.items():
            path = Path(folder) / f"{self.measure}_{name}.parquet"
            write_parquet(path, df)
            paths.append(path)
        return paths
