"""Write the synthetic fleet as hive-partitioned Parquet (one table per modality), its labels and its spec."""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.dataset as pads
import yaml

from dmafn.synthetic import SyntheticConfig, generate, synthetic_spec

log = logging.getLogger(__name__)


def write_synthetic(root: str | Path, cfg: SyntheticConfig = SyntheticConfig(), *,
                    train_days: int | None = None) -> Path:
    """Generate and write the data set under `root`; returns the path of the spec YAML written there."""
    root = Path(root).absolute()
    data = generate(cfg)
    for name, table in data.tables.items():
        pads.write_dataset(table, root / "raw" / name, format="parquet", partitioning=["date"],
                           partitioning_flavor="hive", existing_data_behavior="delete_matching",
                           max_rows_per_group=1 << 17)
        log.info("wrote %s: %d rows", name, table.num_rows)
    labels_dir = root / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    pads.write_dataset(data.labels, labels_dir, format="parquet", existing_data_behavior="delete_matching")
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(synthetic_spec(str(root), cfg, train_days=train_days), sort_keys=False))
    return spec_path
