"""A Lightning CSV logger that keeps a run's history when the run is resumed.

Lightning's `CSVLogger` deletes ``metrics.csv`` when its directory already holds files, so
``chameleon-train run_name=x ckpt_path=last`` (which logs into the same ``runs/x/logs``) would erase every
row before the resume. This one appends: the old rows stay, the file's header is taken over (new metrics
widen it). The steps a resumed run redoes (those after its last checkpoint) appear twice; `read_metrics_csv`
keeps the later rows.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning's version deletes metrics.csv here
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(header)


class CSVLogger(_LightningCSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` (same arguments) that appends to an existing ``metrics.csv``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
