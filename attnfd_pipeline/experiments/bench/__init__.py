"""`attnfd bench` / `make bench`: what caching buys — step time, memory, cache build and read
throughput, storage — measured side by side in one run (explained in docs/bench.md).

Timings on a shared machine are noisy, so every headline figure is a ratio of two things measured in
the same run, interleaved (plain, in-memory, cached, online, then the reverse order on the next
repeat, …), with the median over repeats; CPU-second ratios stand beside the wall-clock ones; the raw
samples are kept in ``results.json["samples"]``.

Everything is the library's own code path: a demo-style dataset generated at the workload size, a
teacher bundle with random weights (BatchNorm statistics calibrated on a few crops so activations stay
in float16 range; speed does not depend on the weights), ``cache.build_cache`` for the cache, and the
training setups built by the same pieces as ``runs.run_student``. Peak memory is measured with
each setup in its own process. torch runs with the intra-op threads the loader workers leave free
(``auto_threads``): on 2 shared cores a 2-thread team stalls at every barrier and identical steps then
vary several-fold.

Modules: ``workload`` (sizes, dataset, teacher bundle, setups), ``measure`` (steps, phases, profiles,
cache build timing), ``memory`` (peak RSS, a process per setup), ``storage`` (storage figures),
``figures`` (the figures from the raw measurements), ``markdown`` (``results.md`` and its advice),
``run`` (``run_bench``).
"""

from attnfd_pipeline.experiments.bench.common import (GOALS, METRIC_KEYS, QUIET_LOAD, STORAGE_MAX_REL_ERROR,
                                                      SWEEP_N, TABLE_KEYS, TOP_KEYS, VARIANTS)
from attnfd_pipeline.experiments.bench.markdown import format_markdown
from attnfd_pipeline.experiments.bench.run import BusyMachineError, check_load, run_bench
from attnfd_pipeline.experiments.bench.workload import DEFAULT, QUICK, Workload

__all__ = ["BusyMachineError", "DEFAULT", "GOALS", "METRIC_KEYS", "QUICK", "QUIET_LOAD", "STORAGE_MAX_REL_ERROR",
           "SWEEP_N", "TABLE_KEYS", "TOP_KEYS", "VARIANTS", "Workload", "check_load", "format_markdown", "run_bench"]
