"""`attnfd bench` / `make bench`: what caching buys — step time, memory, cache build and read
throughput, storage — measured side by side in one run. How it measures, the workload, the figures and
what each module does: docs/bench.md."""

from attnfd_pipeline.experiments.bench.common import (GOALS, METRIC_KEYS, QUIET_LOAD, STORAGE_MAX_REL_ERROR,
                                                      SWEEP_N, TABLE_KEYS, TOP_KEYS, VARIANTS)
from attnfd_pipeline.experiments.bench.markdown import format_markdown
from attnfd_pipeline.experiments.bench.run import BusyMachineError, check_load, run_bench
from attnfd_pipeline.experiments.bench.workload import DEFAULT, QUICK, Workload

__all__ = ["BusyMachineError", "DEFAULT", "GOALS", "METRIC_KEYS", "QUICK", "QUIET_LOAD", "STORAGE_MAX_REL_ERROR",
           "SWEEP_N", "TABLE_KEYS", "TOP_KEYS", "VARIANTS", "Workload", "check_load", "format_markdown", "run_bench"]
