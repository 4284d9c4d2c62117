"""``results.md``: the headline table of figures and goals, the tables behind them, and — for each
missed goal — where the time or memory goes (measured) and what would close it (advice text)."""

from __future__ import annotations

import math

from attnfd_pipeline.experiments.bench.common import (GOALS, STORAGE_MAX_REL_ERROR, TABLE_KEYS, VARIANTS, median)
from attnfd_pipeline.experiments.fidelity import MIN_COSINE


def fmt(x, spec=".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def met_cell(m) -> str:
    return {True: "yes", False: "**no**", None: "–"}[m]


def format_markdown(res: dict) -> str:
    L = _header(res) + _figure_table(res) + noise_notes(res)
    L += _step_section(res) + _memory_section(res) + _throughput_section(res)
    L += _storage_section(res) + _sweep_section(res)
    notes = where_it_goes(res)
    if notes:
        L += ["## Where the time and memory go (goals missed)", ""] + notes
    return "\n".join(L).rstrip() + "\n"


def _header(res: dict) -> list[str]:
    w = res["config"]["workload"]
    s = res["samples"]
    c = s["counts"]
    dev = res["device"]
    dev_s = dev.get("name") or dev.get("cpu") or dev["type"]
    repro = ("`attnfd bench --quick --out DIR` (tiny sizes: the figures mean nothing)" if res["config"].get("quick")
             else "`make bench` (= `attnfd bench --out bench`)")
    load = dev.get("load_average_start") or [None]
    return ["# `make bench` results", "",
            f"Reproduce: {repro}. Device: {dev['type']} ({dev_s}, "
            f"{dev.get('torch_threads')} torch threads, {dev.get('cpu_count')} CPUs), torch {res['torch_version']}; "
            f"wall time {fmt(s.get('wall_s'), '.0f')} s; load average at start {fmt(load[0], '.2f')}"
            + (" (not a quiet machine: read the CPU-second ratios)" if (load[0] or 0) >= 0.5 else "") + ".", "",
            f"Workload: teacher `{w['teacher']}`, student `{w['student']}`, {w['num_classes']} classes, "
            f"crop {w['crop']}, "
            f"batch {w['batch_size']}, targets {'+'.join(w['points'])}, {w['workers']} DataLoader workers; "
            f"{c['train_images']} generated images × K={c['K']} cached; random weights. Every ratio is of two "
            f"figures measured in this run, interleaved ({'/'.join(VARIANTS)}, reversed on odd repeats), median "
            f"over {c['repeats']} repeats of {c['timed_steps_per_block']} timed steps after "
            f"{c['warmup_steps_per_block']} warm-up step(s); raw samples in `results.json` → `samples`.", ""]


def _figure_table(res: dict) -> list[str]:
    L = ["| figure | value | goal | met | CPU-second ratio | per repeat |",
         "| --- | --- | --- | --- | --- | --- |"]
    for key in TABLE_KEYS:
        m = res[key]
        reps = ", ".join(fmt(x, ".2f") for x in m.get("per_repeat", [])) or "–"
        cpu = m.get("cpu_ratio", m.get("cpu_value"))
        L.append(f"| `{key}` | {fmt(m['value'])} | {m.get('goal', '–')} | {met_cell(m.get('met'))} | "
                 f"{fmt(cpu) if cpu is not None else '–'} | {reps} |")
    st = res["storage"]
    L.append(f"| storage: compression vs float32 (best option at rel_error ≤ {STORAGE_MAX_REL_ERROR:g}: "
             f"`{st['best_option']}`) | ×{fmt(st['value'], '.2f')} | {st['goal']} | {met_cell(st['met'])} | – | – |")
    rec = st.get("recommended") or {}
    floor = rec.get("min_cosine", MIN_COSINE)
    if rec.get("encoding"):
        L.append(f"| storage: recommended encoding on the trained teacher (`storage.md`): `{rec['encoding']}` | "
                 f"×{fmt(rec['compression_vs_float16'], '.2f')} vs float16 | gradient cosine ≥ {floor:g} | "
                 f"{met_cell(rec['grad_cosine'] >= floor)} (cosine {rec['grad_cosine']:.6f}, rel. error "
                 f"{rec['rel_error']:.1e}) | – | – |")
    elif rec:
        L.append(f"| storage: recommended encoding | – | gradient cosine ≥ {floor:g} | – ({rec.get('why')}) | – | – |")
    hs = res["head_share_of_cached_over_plain"]
    L += ["", f"`head_share_of_cached_over_plain`: of what the cached step costs over the plain one, the "
          f"distillation head (in-memory − plain, {fmt(hs.get('head_s_per_step'), '+.3f')} s/step) takes this share "
          f"and reading targets (cached − in-memory, {fmt(hs.get('read_s_per_step'), '+.3f')} s/step) the rest. The "
          f"in-memory step is the cached step with its targets already in memory: the limit any cache can reach.", ""]
    return L


def _step_section(res: dict) -> list[str]:
    s = res["samples"]
    sc = res["step_ratio_cached_over_plain"]
    cpu = sc.get("cpu_s_per_step") or {}
    L = ["## Step time (data loading included), median s/step", "",
         "| variant | total (wall) | data wait | forward + loss | backward | optimizer | CPU s (main + workers) |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in VARIANTS:
        b = sc["breakdown_s"][v]
        L.append(f"| {v} | {fmt(sc[f'{v}_s_per_step'])} | {fmt(b['wait'])} | {fmt(b['forward'])} | "
                 f"{fmt(b['backward'])} | {fmt(b['optimizer'])} | {fmt(cpu.get(v))} |")
    L += ["", "Phase columns are medians over all timed steps (they need not add up to the total, a median of "
          "per-repeat medians). CPU seconds per step (training process + its loader workers) barely depend on "
          "what else runs on the machine: their ratios, cached/plain "
          f"{fmt(sc.get('cpu_ratio'))}, cached/in-memory "
          f"{fmt(res['step_ratio_cached_over_inmemory'].get('cpu_ratio'))} and online/cached "
          f"{fmt(res['step_ratio_online_over_cached'].get('cpu_ratio'))}, "
          "cross-check the wall-clock ratios above on a shared machine. Load average at start "
          f"{fmt((res['device'].get('load_average_start') or [None])[0], '.1f')}, at end "
          f"{fmt((s.get('load_average_end') or [None])[0], '.1f')}.", ""]
    return L


def _memory_section(res: dict) -> list[str]:
    mem = res["samples"]["memory"]
    L = ["## Peak memory (each setup in its own process)", "",
         f"Measure: {res['peak_mem_ratio_cached_over_plain']['measure']}.", "",
         "| variant | main process peak RSS | after setup | workers (sum of peaks) | cuda max allocated |",
         "| --- | --- | --- | --- | --- |"]
    for v in VARIANTS:
        m = mem[v]
        wk = m.get("workers_rss_peak_sum_bytes")
        wk_s = f"{wk / 2**20:.0f} MiB ({m['workers']})" if wk else "n/a"
        cu = m.get("cuda_max_allocated_bytes")
        cu_s = f"{cu / 2**20:.0f} MiB" if cu is not None else "–"
        L.append(f"| {v} | {m['rss_peak_bytes'] / 2**20:.0f} MiB | {m['rss_after_setup_bytes'] / 2**20:.0f} MiB | "
                 f"{wk_s} | {cu_s} |")
    if any(str(mem[v].get("process", "own")) != "own" for v in VARIANTS):
        L += ["", "(The setups shared one process here, peak reset between them: the figures only keep the "
              "harness working; `make bench` runs each setup in its own process.)"]
    L += ["", f"Ratios with the workers' peaks added: cached/plain "
          f"{fmt(res['peak_mem_ratio_cached_over_plain']['with_workers_ratio'])}, cached/in-memory "
          f"{fmt(res['peak_mem_ratio_cached_over_inmemory']['with_workers_ratio'])}, online/plain "
          f"{fmt(res['peak_mem_ratio_online_over_plain']['with_workers_ratio'])} (RSS counts shared library pages "
          f"once per process).", ""]
    return L


def _throughput_section(res: dict) -> list[str]:
    cb = res["cache_build_over_teacher_inference"]
    rb = res["samples"]["reader_breakdown_ms"]
    ro = res["reader_over_consumer"]
    return ["## Cache build and read throughput", "",
            f"- cache build {fmt(cb['build_samples_per_s'], '.2f')} samples/s vs bare teacher inference "
            f"{fmt(cb['teacher_samples_per_s'], '.2f')} samples/s on the same batches ({fmt(cb.get('cpu_ratio'))} in "
            f"CPU seconds: bare / build); inside the build the "
            f"teacher ran {fmt(cb.get('teacher_share_in_build'), '.2f')} of the build's wall time, at "
            f"{fmt(cb.get('teacher_in_build_over_bare'), '.2f')}× the bare teacher's speed."
            + (" A build faster than the bare teacher is above the physical limit of 1: other load on the machine "
               "changed the speed of the same computation between the two measurements; the teacher's share of "
               "the build's own wall time is then the cleaner figure." if (cb.get("value") or 0) > 1 else ""),
            f"- cached DataLoader ({ro['workers']} workers, nothing consuming) {fmt(ro['reader_samples_per_s'], '.1f')} "
            f"samples/s vs {fmt(ro['consumer_samples_per_s'], '.2f')} samples/s consumed by the cached step.",
            f"- per sample in one process: plain crop {fmt(rb['plain_crop_ms'], '.1f')} ms, cached replay + hash check "
            f"{fmt(rb['cached_replay_ms'], '.1f')} ms, target read (decode + checksum) "
            f"{fmt(rb['target_read_ms'], '.1f')} ms.",
            ""]


def _storage_section(res: dict) -> list[str]:
    st = res["storage"]
    targets = st["options"][st["recipe_option"]]["targets"]
    L = ["## Storage per sample (teacher outputs of this run)", "",
         "| option | " + " | ".join(f"{t} bytes" for t in targets) + " | total bytes | × vs float32 | max rel_error |",
         "| --- | " + " | ".join("---" for _ in targets) + " | --- | --- | --- |"]
    for name, o in st["options"].items():
        L.append(f"| `{name}` | " + " | ".join(f"{t['bytes_per_sample'] / 1e3:,.1f} kB" for t in o["targets"].values())
                 + f" | {o['bytes_per_sample'] / 1e3:,.1f} kB | {o['compression_vs_float32']:.2f} | "
                   f"{o['rel_error']:.1e} |")
    od = st["on_disk"]
    L += ["", f"On disk (the built cache, `{od['codec']}`, mantissa bits {od['mantissa_bits']}): "
          + ", ".join(f"{k} {v / 1e3:,.1f} kB" for k, v in od["bytes_per_sample"].items())
          + " per sample. Weights are random (BatchNorm calibrated): lossless ratios depend on the value "
            "distribution (zeros), so re-measure on a trained teacher with `attnfd cache plan`.", ""]
    return L


def _sweep_section(res: dict) -> list[str]:
    sw = res["sweep_economics"]
    a = sw["assumptions"]
    L = [f"## Sweep economics (α sweep of N runs, {a['epochs_per_run']} epochs each, cache K={a['K']}; "
         f"seconds per training image)", "",
         "| N | cache + N cached runs | N online runs | online / cached | N plain runs |",
         "| --- | --- | --- | --- | --- |"]
    for n, r in sw["N"].items():
        L.append(f"| {n} | {fmt(r['cached_s_per_image'], '.2f')} | {fmt(r['online_s_per_image'], '.2f')} | "
                 f"{fmt(r['online_over_cached'], '.2f')} | {fmt(r['plain_s_per_image'], '.2f')} |")
    L += ["", f"Break-even: the cache pays for itself from N = {sw['break_even_N']} run(s).", ""]
    return L


def profile_table(rows: list[dict], device_type: str) -> list[str]:
    if not rows:
        return []
    cuda = device_type == "cuda"
    out = ["| op | calls | self CPU ms | CPU total ms |" + (" self device ms |" if cuda else ""),
           "| --- | --- | --- | --- |" + (" --- |" if cuda else "")]
    for r in rows:
        op = r["op"].replace("|", "\\|")
        out.append(f"| `{op}` | {r['calls']} | {r['self_cpu_ms']:.1f} | {r['cpu_total_ms']:.1f} |"
                   + (f" {r.get('self_device_ms', 0):.1f} |" if cuda else ""))
    return out


def noise_notes(res: dict) -> list[str]:
    """Where per-repeat values leave the physically possible range, other load moved the measurement
    more than the effect: say so, and name the figure that is steadier here (CPU seconds per step)."""
    notes = []
    sc, oc = res["step_ratio_cached_over_plain"], res["step_ratio_online_over_cached"]
    ci = res["step_ratio_cached_over_inmemory"]
    se, cb = res["saving_efficiency"], res["cache_build_over_teacher_inference"]
    for key, m in (("step_ratio_cached_over_plain", sc), ("step_ratio_cached_over_inmemory", ci)):
        low = [x for x in m.get("per_repeat", []) if x is not None and x < 1.0]
        if low:
            notes.append(f"- `{key}`: {len(low)} of {len(m['per_repeat'])} repeats are below 1.0, the physical "
                         f"limit (the cached step does the other's work and more): other load on the machine moved "
                         f"step times more than the effect. CPU seconds per step are steadier here: "
                         f"{fmt(m.get('cpu_ratio'))} (online/cached {fmt(oc.get('cpu_ratio'))}).")
    out = [x for x in se.get("per_repeat", []) if x is not None and not (0.0 <= x <= 1.0)]
    if out:
        notes.append(f"- `saving_efficiency`: {len(out)} of {len(se['per_repeat'])} repeats fall outside [0, 1], "
                     f"where it must lie; from CPU seconds per step it is {fmt(se.get('cpu_value'))}.")
    high = [x for x in cb.get("per_repeat", []) if x is not None and x > 1.0]
    if high:
        notes.append(f"- `cache_build_over_teacher_inference`: {len(high)} of {len(cb['per_repeat'])} repeats are "
                     f"above 1.0, the physical limit; the teacher's share of the build's own wall time "
                     f"({fmt(cb.get('teacher_share_in_build'), '.2f')}) does not depend on a second measurement.")
    if notes:
        notes = ["Noise check:", ""] + notes + [""]
    return notes


# ---------------------------------------------------------------------------------------------
# advice: where the time and memory go, for each missed goal


def cpu_delta(b: dict, v: str, base: str = "plain") -> float:
    """CPU seconds per step (process + workers) of variant ``v`` over ``base``."""
    tot = {u: (b[u].get("cpu_main") or 0) + (b[u].get("cpu_workers") or 0) for u in (v, base)}
    return tot[v] - tot[base] if b[v].get("cpu_main") is not None else float("nan")


def sub(x, y) -> float:
    return float(x) - float(y) if x is not None and y is not None else float("nan")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _phase_deltas(b: dict, v: str, u: str) -> dict[str, float]:
    return {p: sub(b[v][p], b[u][p]) for p in ("wait", "forward", "backward", "optimizer")}


def _delta_line(sc: dict, v: str, u: str) -> str:
    d = _phase_deltas(sc["breakdown_s"], v, u)
    tot = (sc[f"{v}_s_per_step"] or 0) - (sc[f"{u}_s_per_step"] or 0)
    return (f"{v} − {u} = {tot * 1e3:+.0f} ms/step: data wait {d['wait'] * 1e3:+.0f} ms, "
            f"forward + loss {d['forward'] * 1e3:+.0f} ms, backward {d['backward'] * 1e3:+.0f} ms, optimizer "
            f"{d['optimizer'] * 1e3:+.0f} ms (phase medians).")


def _target_shapes(res: dict) -> str:
    st = res["storage"]
    targets = st["options"][st["recipe_option"]]["targets"]
    return ", ".join(f"{k} {'×'.join(str(d) for d in t['chw'])}" for k, t in targets.items())


def _step_cause(res: dict, cm: float, cw: float) -> str:
    """Reading (workers' CPU dominates) or the distillation head (training process dominates)."""
    sc = res["step_ratio_cached_over_plain"]
    b = sc["breakdown_s"]
    d = _phase_deltas(b, "cached", "plain")
    big = max(d, key=lambda k: d[k] if math.isfinite(d[k]) else -1e9)
    reading = (cw if math.isfinite(cw) else 0) > (cm if math.isfinite(cm) else 0) or (
        not math.isfinite(cm) and big == "wait")
    if reading:
        return ("Most of it is reading: each cached sample costs the crop replay and hash check plus the "
                "target read (decode + checksum) in the workers, on the cores the step also uses. Would "
                "close it: a cheaper codec for the large maps (`cache.codec = \"none\"` or blosc: ~1 ms vs "
                "~16 ms zstd decode per chunk), fewer cached points, skipping the per-read "
                "checksum after a `cache verify`.")
    wait = b["cached"].get("wait")
    return (f"Most of it is compute in the training process, not reading (the loader keeps up: data wait "
            f"is {fmt(wait * 1e3 if wait is not None else None, '.0f')} "
            f"ms per step): the distillation head — a student CBAM at every point, 1×1 connectors + "
            f"BatchNorm up to the teacher's maps ({_target_shapes(res)}), the bilinear resize and the AttnFD loss, "
            f"forward and backward. The online run pays the same, so the cache cannot remove it; "
            f"`step_ratio_cached_over_inmemory` is the figure of the read path alone. Where it goes: the 1×1 "
            f"connectors (up to 2048 channels at B; every position of the stride-4 map D) and the elementwise "
            f"gating and normalisation at every point (profile below). Would close it: fewer or coarser points, "
            f"a fused loss, or a GPU where these ops are a negligible share of the step.")


def _step_notes(res: dict) -> list[str]:
    sc = res["step_ratio_cached_over_plain"]
    cpu_miss = (sc.get("cpu_ratio") or 0) > GOALS["step_ratio_cached_over_plain"][1]
    if not (sc.get("met") is False or cpu_miss):
        return []
    b = sc["breakdown_s"]
    prof = res["samples"].get("profile", {})
    dev = res["device"]["type"]
    cm = sub(b["cached"].get("cpu_main"), b["plain"].get("cpu_main"))
    cw = sub(b["cached"].get("cpu_workers"), b["plain"].get("cpu_workers"))
    head = (f"### Step: cached / plain = {fmt(sc['value'])} wall clock, {fmt(sc.get('cpu_ratio'))} in CPU "
            f"seconds (goal ≤ 1.10" + (", missed on CPU time)" if sc.get("met") else ")"))
    L = [head, "", f"CPU seconds per step, cached − plain: training process {fmt(cm, '+.3f')} s "
         f"({fmt(cm / b['plain']['cpu_main'] * 100 if b['plain'].get('cpu_main') else None, '+.0f')} %), "
         f"loader workers {fmt(cw, '+.3f')} s. Wall clock: " + _delta_line(sc, "cached", "plain"), "",
         _step_cause(res, cm, cw)]
    if prof.get("cached"):
        L += ["", "Top ops of one cached step (torch.profiler, self time):", ""] + profile_table(prof["cached"], dev)
    if prof.get("plain"):
        L += ["", "Top ops of one plain step:", ""] + profile_table(prof["plain"], dev)
    return L + [""]


def _inmemory_notes(res: dict) -> list[str]:
    ci = res["step_ratio_cached_over_inmemory"]
    pm = res["peak_mem_ratio_cached_over_inmemory"]
    L = []
    if ci.get("met") is False:
        b = res["step_ratio_cached_over_plain"]["breakdown_s"]
        L += [f"### Step: cached / in-memory = {fmt(ci['value'])} wall clock, {fmt(ci.get('cpu_ratio'))} in CPU "
              f"seconds (goal ≤ 1.05)", "",
              "The two steps compute the same thing on the same targets; the difference is the DataLoader "
              "(crop replay, hash check, target read and decode in the workers, batches through shared memory) "
              f"on the cores the step uses. CPU seconds per step, cached − in-memory: "
              f"{fmt(cpu_delta(b, 'cached', 'inmemory'), '+.3f')} s. Wall clock: "
              + _delta_line(res["step_ratio_cached_over_plain"], "cached", "inmemory")
              + " Would close it: a cheaper codec for the large maps, skipping the per-read checksum after a "
                "`cache verify`, or more cores than the step uses.", ""]
    if pm.get("met") is False:
        mem = res["samples"]["memory"]
        L += [f"### Peak memory: cached / in-memory = {fmt(pm['value'])} (goal ≤ 1.05)", "",
              f"Peak in-memory {mem['inmemory']['rss_peak_bytes'] / 2**20:.0f} MiB vs cached "
              f"{mem['cached']['rss_peak_bytes'] / 2**20:.0f} MiB in the training process: the cached process "
              f"also holds the batches its workers prefetch (2 per worker) and the DataLoader's shared-memory "
              f"buffers. Would close it: a smaller `prefetch_factor`, fewer workers.", ""]
    return L


def _saving_notes(res: dict) -> list[str]:
    se = res["saving_efficiency"]
    cpu_eff = se.get("cpu_value")
    if not (se.get("met") is False or (cpu_eff is not None and cpu_eff < GOALS["saving_efficiency"][1])):
        return []
    sc = res["step_ratio_cached_over_plain"]
    b = sc["breakdown_s"]
    prof = res["samples"].get("profile", {})
    L = [f"### Saving efficiency = {fmt(se['value'])} wall clock, {fmt(cpu_eff)} in CPU seconds (goal ≥ 0.9"
         + (", missed on CPU time)" if se.get("met") else ")"), "",
         "(online − cached) / (online − plain): the part of the online run's extra cost that the cache "
         f"removes. CPU seconds per step (process + workers) over plain: online "
         f"{fmt(cpu_delta(b, 'online'), '+.3f')} s, cached {fmt(cpu_delta(b, 'cached'), '+.3f')} s. "
         "Wall clock: " + _delta_line(sc, "online", "plain") + " " + _delta_line(sc, "cached", "plain")
         + " What the cached run still pays is the distillation head and the target read (previous "
           "section); the same measures would close it."]
    if prof.get("online"):
        L += ["", "Top ops of one online step:", ""] + profile_table(prof["online"], res["device"]["type"])
    return L + [""]


def _memory_notes(res: dict) -> list[str]:
    pm = res["peak_mem_ratio_cached_over_plain"]
    if pm.get("met") is not False:
        return []
    s = res["samples"]
    dev = res["device"]["type"]
    mem, par = s["memory"], s.get("params", {})
    st = res["storage"]
    targets = st["options"][st["recipe_option"]]["targets"]
    extra_p = par.get("cached", {}).get("trainable", 0) - par.get("plain", {}).get("trainable", 0)
    tgt = sum(t["float32_bytes_per_sample"] for t in targets.values()) * s["counts"]["batch_size"]
    key = "cuda_max_allocated_bytes" if dev == "cuda" else "rss_peak_bytes"
    L = [f"### Peak memory: cached / plain = {fmt(pm['value'])} (goal ≤ 1.15)", "",
         f"Peak plain {mem['plain'][key] / 2**20:.0f} MiB vs cached {mem['cached'][key] / 2**20:.0f} MiB "
         f"(after setup: {mem['plain']['rss_after_setup_bytes'] / 2**20:.0f} vs "
         f"{mem['cached']['rss_after_setup_bytes'] / 2**20:.0f} MiB RSS). Accounted for: {extra_p / 1e6:.2f} M "
         f"extra trainable parameters (CBAMs + connectors) = {extra_p * 12 / 2**20:.0f} MiB with gradients "
         f"and momentum; one batch of targets as float32 = {tgt / 2**20:.0f} MiB (float16 in the batch, "
         f"float32 in the loss, plus the normalised copies); the connector outputs and loss activations "
         f"kept for backward at every point (D at stride 4 is the largest). Would close it: keep targets "
         f"float16 into the loss, recompute the distillation head in backward (activation checkpointing "
         f"of CBAM + connector + loss), compute and backpropagate the loss point by point, or "
         f"drop/downsample D."]
    pmem = s.get("profile_memory", {})
    for v in ("cached", "plain"):
        if pmem.get(v):
            L += ["", f"Ops allocating the most memory in one {v} step (torch.profiler, self, net):", "",
                  "| op | calls | MiB |", "| --- | --- | --- |"]
            L += [f"| `{r['op']}` | {r['calls']} | {r['self_mib']:.1f} |" for r in pmem[v]]
    return L + [""]


def _build_notes(res: dict) -> list[str]:
    cb = res["cache_build_over_teacher_inference"]
    if cb.get("met") is not False:
        return []
    rows = res["samples"]["cache_build"]
    dev = res["device"]["type"]
    tsec, wsec, lsec, bsec, bare = (median([r[k] for r in rows]) for k in (
        "teacher_seconds", "writer_seconds", "load_seconds", "build_seconds", "bare_seconds"))
    why = []
    if tsec > 1.05 * bare:
        why.append(f"the teacher itself ran {tsec / bare:.2f}× slower inside the build than alone: the "
                   f"loader thread and the writer compete with it for the CPU cores (here shared with the machine's "
                   f"other load too)" + (" — on a GPU they would not" if dev == "cpu" else ""))
    rest = bsec - tsec
    if rest > 0.05 * bsec:
        why.append(f"{rest:.1f} s of the build is outside the teacher's batches: fixed per-build costs — "
                   f"fingerprint, lock, store creation, fsync — and the first shard's load and the last shard's "
                   f"write, which nothing overlaps; with {rows[0]['build_samples']} samples per build they weigh "
                   f"far more than in a real build of thousands")
    return [f"### Cache build / teacher inference = {fmt(cb['value'])} wall clock, {fmt(cb.get('cpu_ratio'))} in "
            f"CPU seconds (goal ≥ 0.9)", "",
            f"Build {bsec:.1f} s vs bare teacher {bare:.1f} s on the same batches. Inside the build: teacher "
            f"{tsec:.1f} s (main thread), loader thread {lsec:.1f} s (crop replay), writer {wsec:.1f} s "
            f"(float16 step, checksums, compression, I/O). " + (_cap("; ".join(why)) + ". " if why else "")
            + "Would close it: a teacher on a GPU (the CPU work then overlaps for free); on CPU, cheaper "
              "writer work (blosc or no codec, vectorised checksums); and, for this measurement, more samples "
              "per build.", ""]


def _reader_notes(res: dict) -> list[str]:
    ro = res["reader_over_consumer"]
    if ro.get("met") is not False:
        return []
    rb = res["samples"]["reader_breakdown_ms"]
    return [f"### Reader / consumer = {fmt(ro['value'])} (goal ≥ 3)", "",
            f"Per sample in one process: crop replay + hash check {rb['cached_replay_ms']:.1f} ms (the plain "
            f"crop alone {rb['plain_crop_ms']:.1f} ms), target read {rb['target_read_ms']:.1f} ms. Would close it: "
            f"raw or blosc storage for the large maps, more workers, skipping the per-read checksum after a "
            f"`cache verify`.", ""]


def _storage_notes(res: dict) -> list[str]:
    st = res["storage"]
    if st.get("met") is not False:
        return []
    lossless = st["options"][st["recipe_option"]]
    tiny = {k: t["tiny_channels"] for k, t in lossless["targets"].items() if t["tiny_channels"] > 0}
    zeros = ", ".join(f"{k} {t.get('zero_fraction', 0) * 100:.0f} %" for k, t in lossless["targets"].items())
    L = [f"### Storage: best ×{fmt(st['value'], '.2f')} vs float32 at rel_error ≤ {STORAGE_MAX_REL_ERROR:g} "
         f"(goal ≥ 3)", ""]
    if lossless["rel_error"] > STORAGE_MAX_REL_ERROR:
        L.append(f"Even lossless float16 has rel_error {lossless['rel_error']:.1e}: channels whose RMS is below "
                 f"1e-4 ({', '.join(f'{k} {v * 100:.1f} %' for k, v in tiny.items()) or 'none'}) fall into "
                 f"float16's subnormal range and keep few significant bits. With random weights "
                 f"the teacher's CBAM gates saturate and produce such channels. Would close it: a per-channel "
                 f"scale stored beside the array, or checking on a trained teacher with `attnfd cache plan`.")
    else:
        L.append(f"float16 gives ×2; lossless codecs gain almost only from exact zeros (here "
                 f"{zeros} zeros), and mantissa rounding adds a few percent. Would close it: more mantissa "
                 f"bits dropped where the error budget allows, fewer points or K, or storing post-ReLU maps; "
                 f"trained teachers' maps may compress differently — re-measure with `attnfd cache plan`.")
    return L + [""]


def where_it_goes(res: dict) -> list[str]:
    """Notes for each missed goal: where the time or memory goes (measured) and what would close it."""
    return (_step_notes(res) + _inmemory_notes(res) + _saving_notes(res) + _memory_notes(res) + _build_notes(res)
            + _reader_notes(res) + _storage_notes(res))
