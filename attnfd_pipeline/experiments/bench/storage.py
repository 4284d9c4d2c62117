"""Storage figures: bytes per sample, compression against float32 and the relative error of every
storage option the cache offers, computed on the teacher outputs of the bench run, and what the built
cache holds on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from attnfd_pipeline.experiments.bench.common import GOALS, STORAGE_MAX_REL_ERROR, goal_met, num


def storage_options(codec: str, level: int, mantissa_options: Sequence[int]) -> list[dict]:
    """The storage options the cache offers: float16 with each lossless codec, then float16 with the
    mantissa rounded (with the recipe's codec, zstd when the recipe stores raw)."""
    lossy_codec = codec if codec != "none" else "zstd"
    opts = [{"name": f"float16+{c}", "codec": c, "level": level if c != "none" else 0, "mantissa_bits": 10}
            for c in dict.fromkeys([codec, "zstd", "blosc", "none"])]
    opts += [{"name": f"float16-m{b}+{lossy_codec}", "codec": lossy_codec, "level": level, "mantissa_bits": b}
             for b in mantissa_options]
    return opts


def _option_figures(outs: dict[str, np.ndarray], opt: dict) -> dict:
    """One option, per target and overall (``plan.measure_storage`` plus the store's chunk overhead)."""
    from attnfd_pipeline.cache.plan import CHUNK_OVERHEAD, measure_storage

    per_target = {}
    for name, x32 in outs.items():
        m = measure_storage(x32, "float16", opt["mantissa_bits"], 1, opt["codec"], opt["level"], target=name)
        stored, f32 = m["stored_bytes"] + CHUNK_OVERHEAD, 2 * m["raw_bytes"]
        per_target[name] = {"chw": list(x32.shape[1:]), "float32_bytes_per_sample": f32, "bytes_per_sample": stored,
                            "compression_vs_float32": f32 / stored,
                            **{k: m[k] for k in ("rel_error", "tiny_channels", "zero_fraction")}}
    f32_total = sum(t["float32_bytes_per_sample"] for t in per_target.values())
    stored_total = sum(t["bytes_per_sample"] for t in per_target.values())
    return {**{k: opt[k] for k in ("codec", "level", "mantissa_bits")},
            "targets": per_target, "bytes_per_sample": stored_total, "float32_bytes_per_sample": f32_total,
            "compression_vs_float32": f32_total / stored_total,
            "rel_error": max(t["rel_error"] for t in per_target.values())}


def storage_analysis(outs: dict[str, np.ndarray], options: Sequence[dict]) -> dict:
    """Bytes per sample, compression vs float32 and rel. L2 error (channel-normalised) per option and
    target; the figure is the best compression among the options within ``STORAGE_MAX_REL_ERROR``."""
    figs = {opt["name"]: _option_figures(outs, opt) for opt in options}
    ok = {k: v for k, v in figs.items() if v["rel_error"] <= STORAGE_MAX_REL_ERROR}
    best = max(ok, key=lambda k: ok[k]["compression_vs_float32"]) if ok else None
    value = num(ok[best]["compression_vs_float32"]) if best else None
    default = next(iter(figs))
    rec = figs[default]  # the recipe's option: its per-target figures
    return {"options": figs, "rel_error_limit": STORAGE_MAX_REL_ERROR, "recipe_option": default, "best_option": best,
            "value": value, "goal": f">= {GOALS['storage'][1]:g} at rel_error <= {STORAGE_MAX_REL_ERROR:g}",
            "met": goal_met("storage", value) if best else False,
            "bytes_per_sample": {k: v["bytes_per_sample"] for k, v in rec["targets"].items()},
            "compression_vs_float32": rec["compression_vs_float32"],
            "rel_error": {k: v["rel_error"] for k, v in figs.items()}}


def on_disk(cache_dir: Path, samples: int) -> dict:
    """What the built cache holds: its codec, mantissa bits and bytes per sample per target."""
    from attnfd_pipeline.cache import describe_cache

    disk = describe_cache(cache_dir)
    return {"codec": disk["codec"], "mantissa_bits": disk["mantissa_bits"],
            "bytes_per_sample": {k: v["bytes_on_disk"] / max(1, samples) for k, v in disk["targets"].items()},
            "size_bytes": disk["size_bytes"], "samples": samples}
