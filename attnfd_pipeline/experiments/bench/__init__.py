"""`attnfd bench` / `make bench`: what caching buys — step time, memory, cache build and read
throughput, storage — measured side by side in one run. How it measures, the workload, the figures and
what each module does: docs/bench.md."""

from attnfd_pipeline.experiments.bench.common import (GOALS, METRIC_KEYS, QUIET_LOAD, SWEEP_N, TABLE_KEYS, TOP_KEYS,
                                                      VARIANTS)
from attnfd_pipeline.experiments.bench.run import BusyMachineError, check_load, run_bench

__all__ = ["BusyMachineError", "GOALS", "METRIC_KEYS", "QUIET_LOAD", "SWEEP_N", "TABLE_KEYS", "TOP_KEYS", "VARIANTS",
           "check_load", "run_bench"]
