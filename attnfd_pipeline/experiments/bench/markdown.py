"""``results.md``: the headline table of figures and goals, the tables behind them, and one paragraph of
advice (with its profile tables) for each missed goal."""

from __future__ import annotations

from attnfd_pipeline.experiments.bench.common import (GOALS, QUIET_LOAD, STEP_PHASES, STORAGE_MAX_REL_ERROR, TABLE_KEYS,
                                                      VARIANTS, fmt, goal_met, table)
from attnfd_pipeline.experiments.fidelity import MIN_COSINE


def met_cell(m) -> str:
    return {True: "yes", False: "**no**", None: "–"}[m]


def cpu_figure(m: dict):
    """A figure's CPU-second counterpart (a ratio, else a value; None where it has none)."""
    return m.get("cpu_ratio", m.get("cpu_value"))


# what closes each goal when it is missed, and the profiled steps (``samples.profile``: time,
# ``samples.profile_memory``: memory) that show where it goes
_READ = ("a cheaper codec for the large maps (`cache.codec = \"none\"` or blosc), skipping the per-read checksum "
         "after a `cache verify`")
ADVICE: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "step_ratio_cached_over_plain": (
        "Most of the extra time is the distillation head (CBAM, connectors and loss at every point), which online "
        f"distillation pays too: use fewer or coarser points, a fused loss or a GPU; for the read, {_READ}.",
        ("cached", "plain"), ()),
    "step_ratio_cached_over_inmemory": (f"The difference is the DataLoader: {_READ}, or more cores.", (), ()),
    "peak_mem_ratio_cached_over_inmemory": (
        "The cached process also holds its workers' prefetched batches: lower `prefetch_factor` or the workers.",
        (), ()),
    "saving_efficiency": (
        "The cached run still pays the head and the read: the advice for `step_ratio_cached_over_plain` applies.",
        ("online",), ()),
    "peak_mem_ratio_cached_over_plain": (
        "Keep targets float16 into the loss, checkpoint the head's activations (CBAM + connector + loss), compute "
        "the loss point by point, or drop or downsample D (the largest map).", (), ("cached", "plain")),
    "cache_build_over_teacher_inference": (
        "Run the teacher on a GPU (the CPU work then overlaps); on CPU, cheaper writer work (blosc or no codec); "
        "for this measurement, more samples per build.", (), ()),
    "reader_over_consumer": (f"More loader workers, or {_READ}.", (), ()),
    "storage": (
        "Drop more mantissa bits where the error budget allows, cache fewer points or a smaller K, and re-measure "
        "on a trained teacher with `attnfd cache plan`.", (), ()),
}
assert set(ADVICE) == set(GOALS)


def format_markdown(res: dict) -> str:
    L = _header(res) + _figure_table(res) + _step_section(res) + _memory_section(res) + _other_section(res)
    L += _storage_section(res) + _sweep_section(res) + advice(res)
    return "\n".join(L).rstrip() + "\n"


def _header(res: dict) -> list[str]:
    w, s, dev = res["config"]["workload"], res["samples"], res["device"]
    c = s["counts"]
    dev_s = dev.get("name") or dev.get("cpu") or dev["type"]
    repro = ("`attnfd bench --quick --out DIR` (tiny sizes: the figures mean nothing)" if res["config"].get("quick")
             else "`make bench` (= `attnfd bench --out bench`)")
    load = dev.get("load_average_start") or [None]
    return ["# `make bench` results", "",
            f"Reproduce: {repro}. Device: {dev['type']} ({dev_s}, "
            f"{dev.get('torch_threads')} torch threads, {dev.get('cpu_count')} CPUs), torch {res['torch_version']}; "
            f"wall time {fmt(s.get('wall_s'), '.0f')} s; load average at start {fmt(load[0], '.2f')}"
            + (" (not a quiet machine: read the CPU-second ratios)" if (load[0] or 0) >= QUIET_LOAD else "") + ".", "",
            f"Workload: teacher `{w['teacher']}`, student `{w['student']}`, {w['num_classes']} classes, "
            f"crop {w['crop']}, "
            f"batch {w['batch_size']}, targets {'+'.join(w['points'])}, {w['workers']} DataLoader workers; "
            f"{c['train_images']} generated images × K={c['K']} cached; random weights. Every ratio is of two "
            f"figures measured in this run, interleaved ({'/'.join(VARIANTS)}, reversed on odd repeats), median "
            f"over {c['repeats']} repeats of {c['timed_steps_per_block']} timed steps after "
            f"{c['warmup_steps_per_block']} warm-up step(s); raw samples in `results.json` → `samples`.", ""]


def _figure_table(res: dict) -> list[str]:
    rows = []
    for key in TABLE_KEYS:
        m = res[key]
        cpu = cpu_figure(m)
        rows.append([f"`{key}`", fmt(m["value"]), m.get("goal", "–"), met_cell(m.get("met")),
                     fmt(cpu) if cpu is not None else "–",
                     ", ".join(fmt(x, ".2f") for x in m.get("per_repeat", [])) or "–"])
    st = res["storage"]
    rows.append([f"storage: compression vs float32 (best option at rel_error ≤ {STORAGE_MAX_REL_ERROR:g}: "
                 f"`{st['best_option']}`)", f"×{fmt(st['value'], '.2f')}", st["goal"], met_cell(st["met"]), "–", "–"])
    rec = st.get("recommended") or {}
    floor = rec.get("min_cosine", MIN_COSINE)
    if rec.get("encoding"):
        rows.append([f"storage: recommended encoding on the trained teacher (`storage.md`): `{rec['encoding']}`",
                     f"×{fmt(rec['compression_vs_float16'], '.2f')} vs float16", f"gradient cosine ≥ {floor:g}",
                     f"{met_cell(rec['grad_cosine'] >= floor)} (cosine {rec['grad_cosine']:.6f}, rel. error "
                     f"{rec['rel_error']:.1e})", "–", "–"])
    elif rec:
        rows.append(["storage: recommended encoding", "–", f"gradient cosine ≥ {floor:g}", f"– ({rec.get('why')})",
                     "–", "–"])
    return table(["figure", "value", "goal", "met", "CPU-second ratio", "per repeat"], rows) + [""]


def _step_section(res: dict) -> list[str]:
    sc = res["step_ratio_cached_over_plain"]
    cpu = sc.get("cpu_s_per_step") or {}
    rows = [[v, fmt(sc[f"{v}_s_per_step"])] + [fmt(sc["breakdown_s"][v][p]) for p in STEP_PHASES] + [fmt(cpu.get(v))]
            for v in VARIANTS]
    return ["## Step time (data loading included), median s/step", ""] + table(
        ["variant", "total (wall)", "data wait", "forward + loss", "backward", "optimizer", "CPU s (main + workers)"],
        rows) + [""]


def _mib(b) -> str:
    return f"{b / 2**20:.0f} MiB"


def _memory_section(res: dict) -> list[str]:
    mem = res["samples"]["memory"]
    shared = any(str(mem[v].get("process", "own")) != "own" for v in VARIANTS)
    rows = []
    for v in VARIANTS:
        m = mem[v]
        wk, cu = m.get("workers_rss_peak_sum_bytes"), m.get("cuda_max_allocated_bytes")
        rows.append([v, _mib(m["rss_peak_bytes"]), _mib(m["rss_after_setup_bytes"]),
                     f"{_mib(wk)} ({m['workers']})" if wk else "n/a", _mib(cu) if cu is not None else "–"])
    return [f"## Peak memory: {res['peak_mem_ratio_cached_over_plain']['measure']} ("
            + ("the setups shared one process: a harness check only)" if shared else "each setup in its own process)"),
            ""] + table(["variant", "main process peak RSS", "after setup", "workers (sum of peaks)",
                         "cuda max allocated"], rows) + [""]


# (label, figure, field, format) of the figures no other table shows
OTHER = (
    ("distillation head, in-memory − plain (s/step)", "head_share_of_cached_over_plain", "head_s_per_step", "+.3f"),
    ("reading targets, cached − in-memory (s/step)", "head_share_of_cached_over_plain", "read_s_per_step", "+.3f"),
    ("peak memory with workers: cached / plain", "peak_mem_ratio_cached_over_plain", "with_workers_ratio", ".3f"),
    ("peak memory with workers: cached / in-memory", "peak_mem_ratio_cached_over_inmemory", "with_workers_ratio",
     ".3f"),
    ("peak memory with workers: online / plain", "peak_mem_ratio_online_over_plain", "with_workers_ratio", ".3f"),
    ("cache build (samples/s)", "cache_build_over_teacher_inference", "build_samples_per_s", ".2f"),
    ("bare teacher inference (samples/s)", "cache_build_over_teacher_inference", "teacher_samples_per_s", ".2f"),
    ("teacher's share of the build's wall time", "cache_build_over_teacher_inference", "teacher_share_in_build",
     ".2f"),
    ("teacher in the build / bare teacher", "cache_build_over_teacher_inference", "teacher_in_build_over_bare",
     ".2f"),
    ("cached DataLoader, nothing consuming (samples/s)", "reader_over_consumer", "reader_samples_per_s", ".1f"),
    ("consumed by the cached step (samples/s)", "reader_over_consumer", "consumer_samples_per_s", ".2f"),
    ("plain crop (ms/sample, one process)", "reader_breakdown_ms", "plain_crop_ms", ".1f"),
    ("cached replay + hash check (ms/sample)", "reader_breakdown_ms", "cached_replay_ms", ".1f"),
    ("target read, decode + checksum (ms/sample)", "reader_breakdown_ms", "target_read_ms", ".1f"),
)


def _other_section(res: dict) -> list[str]:
    src = {**res, "reader_breakdown_ms": res["samples"]["reader_breakdown_ms"]}
    rows = [[label, fmt(src[key].get(field), spec)] for label, key, field, spec in OTHER]
    rows.append(["load average at end", fmt((res["samples"].get("load_average_end") or [None])[0], ".1f")])
    return ["## Throughput and the other figures", ""] + table(["figure", "value"], rows) + [""]


def _kb(b) -> str:
    return f"{b / 1e3:,.1f} kB"


def _storage_section(res: dict) -> list[str]:
    st = res["storage"]
    targets = list(st["options"][st["recipe_option"]]["targets"])
    rows = [[f"`{name}`"] + [_kb(o["targets"][t]["bytes_per_sample"]) for t in targets]
            + [_kb(o["bytes_per_sample"]), f"{o['compression_vs_float32']:.2f}", f"{o['rel_error']:.1e}"]
            for name, o in st["options"].items()]
    od = st["on_disk"]
    rows.append([f"on disk (the built cache, `{od['codec']}`, mantissa bits {od['mantissa_bits']})"]
                + [_kb(od["bytes_per_sample"][t]) if t in od["bytes_per_sample"] else "–" for t in targets]
                + [_kb(sum(od["bytes_per_sample"].values())), "–", "–"])
    return ["## Storage per sample (teacher outputs of this run: random weights, re-measure a trained teacher with "
            "`attnfd cache plan`)", ""] + table(["option"] + [f"{t} bytes" for t in targets]
                                               + ["total bytes", "× vs float32", "max rel_error"], rows) + [""]


def _sweep_section(res: dict) -> list[str]:
    sw = res["sweep_economics"]
    a = sw["assumptions"]
    rows = [[n] + [fmt(r[k], ".2f") for k in ("cached_s_per_image", "online_s_per_image", "online_over_cached",
                                              "plain_s_per_image")] for n, r in sw["N"].items()]
    return [f"## Sweep economics (α sweep of N runs, {a['epochs_per_run']} epochs each, cache K={a['K']}; "
            f"seconds per training image)", ""] + table(
        ["N", "cache + N cached runs", "N online runs", "online / cached", "N plain runs"], rows) + [
        "", f"Break-even: the cache pays for itself from N = {sw['break_even_N']} run(s).", ""]


def profile_table(rows: list[dict], device_type: str) -> list[str]:
    cuda = device_type == "cuda"
    return table(["op", "calls", "self CPU ms", "CPU total ms"] + (["self device ms"] if cuda else []), [
        [f"`{r['op'].replace('|', chr(92) + '|')}`", r["calls"], f"{r['self_cpu_ms']:.1f}", f"{r['cpu_total_ms']:.1f}"]
        + ([f"{r.get('self_device_ms', 0):.1f}"] if cuda else []) for r in rows])


def missed(res: dict, key: str) -> bool:
    """A goal is missed on the wall clock or in CPU seconds (the steadier figure on a shared machine)."""
    cpu = cpu_figure(res[key])
    return res[key].get("met") is False or (cpu is not None and goal_met(key, cpu) is False)


def advice(res: dict) -> list[str]:
    """For each missed goal: what would close it, and the profile tables of the steps behind it."""
    prof, pmem = res["samples"].get("profile", {}), res["samples"].get("profile_memory", {})
    L = []
    for key, (text, times, mems) in ADVICE.items():
        if not missed(res, key):
            continue
        m = res[key]
        cpu = cpu_figure(m)
        L += [f"### `{key}` = {fmt(m['value'])} (goal {m['goal']}"
              + (f"; from CPU seconds {fmt(cpu)})" if cpu is not None else ")"), "", text]
        for v in (v for v in times if prof.get(v)):
            L += ["", f"Top ops of one {v} step (torch.profiler, self time):", ""]
            L += profile_table(prof[v], res["device"]["type"])
        for v in (v for v in mems if pmem.get(v)):
            L += ["", f"Ops allocating the most memory in one {v} step (torch.profiler, self, net):", ""]
            L += table(["op", "calls", "MiB"], [[f"`{r['op']}`", r["calls"], f"{r['self_mib']:.1f}"] for r in pmem[v]])
        L.append("")
    return ["## Advice (goals missed)", ""] + L if L else []
