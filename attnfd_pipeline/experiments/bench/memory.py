"""Peak memory: a process's peak RSS from /proc, and the peak-memory measurement, each training setup in a
fresh interpreter (why: docs/bench.md "How it measures")."""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from attnfd_pipeline.experiments.bench.common import log
from attnfd_pipeline.experiments.bench.measure import shutdown, train_block, worker_pids
from attnfd_pipeline.experiments.bench.workload import Workload, block_keys, build_setup
from attnfd_pipeline.errors import UserError


def proc_kb(pid: int | str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak RSS of this process. Linux: ``VmHWM`` — ``ru_maxrss`` is preserved across ``execve`` and so
    reports the launching parent's peak in a freshly started child; elsewhere ``ru_maxrss``."""
    kb = proc_kb("self", "VmHWM")
    if kb is not None:
        return kb * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _measure_variant(spec: dict, variant: str, device: torch.device, cfg, keys, shared: str) -> dict:
    """Build one setup, train on ``keys``, report the process's (and its workers') peaks."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hwm0 = peak_rss_bytes()
    setup = build_setup(cfg, variant, num_classes=spec["num_classes"], bundle=spec["bundle"],
                        cache_dir=spec["cache_dir"], device=device)
    hwm_setup = peak_rss_bytes()
    setup_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    records, _ = train_block(setup, keys, warmup=0)
    pids = worker_pids(setup)
    worker_hwm = [k * 1024 for k in (proc_kb(p, "VmHWM") for p in pids) if k is not None]
    out = {
        "variant": variant,
        "process": shared,
        "steps": len(records),
        "rss_peak_bytes": peak_rss_bytes(),
        "rss_peak_source": "VmHWM" if proc_kb("self", "VmHWM") is not None else "ru_maxrss",
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_setup_bytes": hwm0,
        "rss_after_setup_bytes": hwm_setup,
        "workers": len(pids),
        "workers_rss_peak_bytes": worker_hwm,
        "workers_rss_peak_sum_bytes": sum(worker_hwm) if worker_hwm else None,
        "step_s": [r["total"] for r in records],
    }
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_setup_allocated_bytes"] = setup_alloc
    shutdown(setup)
    return out


def memory_child(spec_path: str) -> None:
    """Entry point of a peak-memory process: for each variant of the spec, build its setup, train
    ``len(keys) / batch`` steps, report the peaks. One variant per process is the measurement; several
    (``--quick``) reset the peak between variants, so later ones also count what earlier ones left."""
    from attnfd_pipeline.config import load_config

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    cfg = load_config(spec["config"])
    keys = [tuple(k) for k in spec["keys"]]
    variants = spec["variants"]
    results = {}
    for i, variant in enumerate(variants):
        if i > 0:  # the previous variant's garbage is collected at the end of its turn
            reset_peak_rss()
        shared = "own" if len(variants) == 1 else f"shared ({i + 1}/{len(variants)})"
        results[variant] = _measure_variant(spec, variant, device, cfg, keys, shared)
        gc.collect()
    Path(spec["out"]).write_text(json.dumps(results))


def _run_child(spec: dict, group: Sequence[str], work: Path) -> dict:
    """One peak-memory process for the variants of ``group``; its records."""
    tag = "-".join(group)
    out, spec_path = work / f"mem-{tag}.json", work / f"mem-{tag}.spec.json"
    spec_path.write_text(json.dumps({**spec, "variants": list(group), "out": str(out)}))
    cmd = [sys.executable, "-c",
           "import sys; from attnfd_pipeline.experiments.bench.memory import memory_child; memory_child(sys.argv[1])",
           str(spec_path)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory process for {'/'.join(group)} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    for v, r in res.items():
        log(f"memory {v}: peak RSS {r['rss_peak_bytes'] / 2**20:.0f} MiB"
            + (f", workers {r['workers_rss_peak_sum_bytes'] / 2**20:.0f} MiB"
               if r.get("workers_rss_peak_sum_bytes") else ""))
    return res


def measure_memory(cfg, w: Workload, variants: Sequence[str], *, bundle: Path, cache_dir: Path,
                   device: torch.device, n_images: int, work: Path) -> dict[str, dict]:
    """Peak memory of each variant's training process over ``w.memory_steps`` steps, by ``w.memory_mode``:
    ``each`` (a fresh interpreter per variant: the measurement), ``one`` (a single process for all, peak reset
    between them) or ``inline`` (this process's peak, nothing trained); the last two only keep the harness
    working in ``--quick``."""
    from attnfd_pipeline.config import dump_toml

    if w.memory_mode == "inline":
        return {v: {"rss_peak_bytes": peak_rss_bytes(), "process": "shared"} for v in variants}
    if w.memory_mode not in ("each", "one"):
        raise UserError(f"memory mode {w.memory_mode!r}: expected each, one or inline")
    keys = block_keys(cfg, n_images, max(1, w.memory_steps) * w.batch_size, first_epoch=77_000)
    cfg_path = work / "mem.toml"
    cfg_path.write_text(dump_toml(cfg))
    spec = {"config": str(cfg_path), "num_classes": w.num_classes, "bundle": str(bundle),
            "cache_dir": str(cache_dir), "device": str(device), "threads": torch.get_num_threads(),
            "keys": [list(k) for k in keys]}
    results: dict[str, dict] = {}
    for group in [variants] if w.memory_mode == "one" else [[v] for v in variants]:
        results.update(_run_child(spec, group, work))
    return results
