"""What a compact cache costs: fidelity, size and encode/decode speed of each storage variant
(``cache.encoding`` × ``cache.pool``) on a teacher's real maps; what each figure measures, and why:
docs/storage.md "Fidelity".

``storage_figures`` measures those figures per variant and crop: the gradient ones the worst over the assumed
student maps (``noise_students`` at each of ``RHOS``, ``untrained_student_maps``), the speeds per core
(``thread_time``, so other processes on a busy machine do not count). ``recommended`` is the smallest variant
whose worst gradient cosine is ≥ ``MIN_COSINE`` at every crop. ``feed_projection`` turns the per-core speeds into
the CPU cores a cache build and a DataLoader need at the assumed throughputs of ``RTX_CLASS``.
``attnfd bench-storage`` writes ``bench/storage.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnfd_pipeline.cache.encoding import CHECKSUM, checksum, decode, encode_target, pool_of, pool_student
from attnfd_pipeline.cache.plan import measure_storage, storage_variants, variant_name
from attnfd_pipeline.cache.schema import cache_target_names
from attnfd_pipeline.losses.attnfd import attnfd_loss
from attnfd_pipeline.errors import UserError

RHOS = (1.0, 0.3)
# a compact encoding is recommended when the distillation gradient it gives points within ~2.6° of float16's
MIN_COSINE = 0.999
# how a figure's worst is taken over targets, students and crops
WORST = {"rel_error": max, "grad_cosine": min, "grad_rel_error": max, "loss_rel_error": max,
         "compression_vs_float16": min, "zstd_ratio": min}
GRAD_KEYS = ("grad_cosine", "grad_rel_error", "loss_rel_error")


def worst(rows, keys) -> dict[str, float]:
    """The worst of each of ``keys`` (by ``WORST``) over the dicts ``rows``."""
    rows = list(rows)
    return {k: WORST[k](r[k] for r in rows) for k in keys}


def teacher_from_checkpoint(cfg, path) -> Any:
    """The frozen ``inpath`` teacher of a teacher training checkpoint (``runs/<name>/teacher/train/last.pt``),
    for measuring before the run has written its bundle; read as every checkpoint is
    (``engine.checkpoint.load_checkpoint``: hash-checked, weights-only, migrated)."""
    from attnfd_pipeline.engine.checkpoint import load_checkpoint, load_modules
    from attnfd_pipeline.models import build_model
    from attnfd_pipeline.teacher import FrozenTeacher

    t = cfg.teacher
    if t.cbam_mode != "inpath":
        raise UserError(f"{path}: only an inpath teacher's checkpoint holds its CBAMs (teacher.cbam_mode is "
                         f"{t.cbam_mode!r}); use its bundle")
    state = load_checkpoint(path)
    model = build_model(t.model.name, cfg.data.num_classes,
                        output_stride=t.model.output_stride, inpath_attention=t.points)
    load_modules(model, state["modules"], path)
    info = {"model": t.model.name, "checkpoint": str(path), "epoch": state.get("epoch"), "cbam_mode": "inpath",
            "sha256": f"checkpoint-epoch-{state.get('epoch')}"}
    return FrozenTeacher(model, None, "inpath", t.points, info)


def teacher_maps(cfg, teacher, source, crop: int, images: int) -> dict[str, np.ndarray]:
    """float32 targets ``(n, C, H, W)`` of the first ``images`` images, resized to ``crop`` × ``crop``."""
    from attnfd_pipeline.cache.build import run_teacher, teacher_device

    outs, _ = run_teacher(teacher, _crops(cfg, source, crop, images), cache_target_names(cfg.cache), 4,
                          teacher_device(teacher))
    return outs


def _crops(cfg, source, crop: int, images: int) -> list:
    """The first ``images`` training images resized to ``crop`` × ``crop``, no random augmentation."""
    from attnfd_pipeline.cache.build import shard_samples
    from attnfd_pipeline.cache.schema import ShardRange

    aug = dataclasses.replace(cfg.augment, crop_size=(crop, crop), base_size=crop, scale_min=1.0, scale_max=1.0,
                              flip_p=0.0, blur_p=0.0)
    one = dataclasses.replace(cfg, augment=aug, cache=dataclasses.replace(cfg.cache, K=1))
    return shard_samples(one, source, ShardRange(0, 0, min(images, len(source))), source.ids)[1]


TIMING_PASSES = 3


def _timed(x: np.ndarray, encoding: str, pool: int, name: str) -> tuple[float, float]:
    """CPU seconds of one thread to encode (pool + convert/quantise + checksum + zstd level 1 per sample) and to
    decode (zstd + checksum + dequantise) ``x``."""
    import numcodecs

    comp, n = numcodecs.Zstd(level=1), len(x)
    t0 = time.thread_time()
    parts = encode_target(x, encoding, 0, pool, target=name, ids=[str(i) for i in range(n)], seeds=[0] * n)
    for j in range(n):
        checksum([p[j] for p in parts], CHECKSUM)
    frames = [[comp.encode(np.ascontiguousarray(p[j])) for p in parts] for j in range(n)]
    t1 = time.thread_time()
    out = []
    for fr in frames:
        got = [np.frombuffer(comp.decode(f), dtype=p.dtype).reshape(p.shape[1:]) for f, p in zip(fr, parts)]
        checksum(got, CHECKSUM)
        out.append(decode(encoding, got))
    np.stack(out).astype(np.float32)
    return t1 - t0, time.thread_time() - t1


def noise_students(ref32: np.ndarray) -> dict[str, np.ndarray]:
    """Student maps ``teacher + rho · RMS · white noise`` (seeded) for each rho in ``RHOS``."""
    g = np.random.default_rng(0)
    rms = float(np.sqrt(np.mean(ref32.astype(np.float64) ** 2)))
    return {f"noise{rho:g}": (ref32 + rho * rms * g.standard_normal(ref32.shape)).astype(np.float32) for rho in RHOS}


def grad_fidelity(ref32: np.ndarray, stored: np.ndarray, pool: int, norm: str,
                  students: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Loss and gradient w.r.t. each student map (full resolution) with ``stored`` targets (pooled by
    ``pool``, the student map pooled the same way) against the loss on float32 targets at full resolution.
    ``students`` default: ``noise_students``. Returns the worst figures and each student's."""
    t32 = torch.from_numpy(ref32)
    tq = torch.from_numpy(stored)
    each = {}
    for label, smap in (students if students is not None else noise_students(ref32)).items():
        grads, losses = [], []
        for target, f in ((t32, 1), (tq, pool)):
            s = torch.from_numpy(smap).clone().requires_grad_(True)
            x = pool_student(s, t32.shape[-2:], f) if f > 1 else s
            loss = attnfd_loss(x, target, norm)
            loss.backward()
            grads.append(s.grad.double().flatten())
            losses.append(float(loss.detach()))
        a, b = grads
        each[label] = {"grad_cosine": float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300)),
                       "grad_rel_error": float((b - a).norm() / a.norm().clamp_min(1e-300)),
                       "loss_rel_error": abs(losses[1] - losses[0]) / max(abs(losses[0]), 1e-300)}
    return {**worst(each.values(), GRAD_KEYS), "students": each}


def untrained_student_maps(cfg, source, crop: int, images: int, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The config's student at initialisation (seeded), each point through a seeded 1×1 connector to the
    teacher's channels and resized to the teacher's map: spatially realistic maps of a student at the start
    of distillation (``norm`` makes their scale irrelevant)."""
    from attnfd_pipeline.models import build_model

    crops = _crops(cfg, source, crop, images)
    m = cfg.student.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(m.name, cfg.data.num_classes, output_stride=m.output_stride).eval()
        with torch.no_grad():
            out = model(torch.stack(list(crops)))
            maps = {}
            for p, (C, H, W) in shapes.items():
                conn = torch.nn.Conv2d(out[p].shape[1], C, 1)
                maps[p] = torch.nn.functional.interpolate(conn(out[p]), size=(H, W), mode="bilinear",
                                                          align_corners=False).numpy()
    return maps


def _variant_at_crop(maps: dict[str, np.ndarray], encoding: str, pool, norm: str,
                     student: dict[str, np.ndarray]) -> dict[str, Any]:
    """One variant on one crop's maps: per-target figures and their totals."""
    per, enc_s, dec_s = {}, 0.0, 0.0
    for name, x in maps.items():
        f = pool_of(pool, name)
        # the fastest of a few passes: CPU time of one thread still grows when other processes share the
        # caches and memory bandwidth, and the least disturbed pass is the steadiest estimate
        enc, dec = zip(*(_timed(x, encoding, f, name) for _ in range(TIMING_PASSES)))
        enc_s, dec_s = enc_s + min(enc), dec_s + min(dec)
        m = measure_storage(x, encoding, 0, f, "zstd", 1, target=name)
        y = m["decoded"]
        per[name] = {"chw": list(y.shape[1:]), "rel_error": m["rel_error"], "tiny_channels": m["tiny_channels"],
                     **grad_fidelity(x, y, f, norm, {**noise_students(x), "untrained": student[name]}),
                     "stored_bytes_per_sample": m["stored_bytes"], "raw_bytes_per_sample": m["raw_bytes"]}
    f32_mb = sum(x.nbytes for x in maps.values()) / 1e6
    return {"targets": per, "stored_bytes_per_sample": sum(t["stored_bytes_per_sample"] for t in per.values()),
            **worst(per.values(), ("rel_error", *GRAD_KEYS)),
            "grad_cosine_by_student": {k: min(t["students"][k]["grad_cosine"] for t in per.values())
                                       for k in next(iter(per.values()))["students"]},
            "encode_mb_s": f32_mb / enc_s, "decode_mb_s": f32_mb / dec_s}


def storage_figures(cfg, teacher, source, *, crops=(64, 257), images: int = 8) -> dict:
    """Fidelity, size and speed of every storage variant at each crop (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core figures
    try:
        variants = storage_variants(cfg.cache)
        out: dict[str, Any] = {"crops": list(crops), "images": images, "norm": cfg.student.norm,
                               "points": cache_target_names(cfg.cache), "student_noise_rho": list(RHOS),
                               "students": [f"noise{r:g}" for r in RHOS] + ["untrained"],
                               "variants": {}}
        for crop in crops:
            maps = teacher_maps(cfg, teacher, source, crop, images)
            student = untrained_student_maps(cfg, source, crop, images,
                                             {n: x.shape[1:] for n, x in maps.items() if n in cfg.cache.points})
            for encoding, pool in variants:
                name = variant_name(encoding, pool)
                out["variants"].setdefault(name, {"encoding": encoding, "pool": dict(pool), "crops": {}})
                out["variants"][name]["crops"][str(crop)] = _variant_at_crop(maps, encoding, pool, cfg.student.norm,
                                                                             student)
    finally:
        torch.set_num_threads(threads)
    for v in out["variants"].values():
        for crop, r in v["crops"].items():
            r["compression_vs_float16"] = (out["variants"]["float16"]["crops"][crop]["stored_bytes_per_sample"]
                                           / r["stored_bytes_per_sample"])
            raw = sum(t["raw_bytes_per_sample"] for t in r["targets"].values())
            r["zstd_ratio"] = raw / r["stored_bytes_per_sample"]
        v.update(worst(v["crops"].values(), ("grad_cosine", "rel_error", "compression_vs_float16", "zstd_ratio")))
    ok = [n for n, v in out["variants"].items() if v["grad_cosine"] >= MIN_COSINE]
    best = max(ok, key=lambda n: out["variants"][n]["compression_vs_float16"]) if ok else "float16"
    b = out["variants"][best]
    out["recommended"] = {"encoding": best, **{k: b[k] for k in ("compression_vs_float16", "grad_cosine", "rel_error")}}
    out["min_cosine"] = MIN_COSINE
    return out


def storage_markdown(fig: dict) -> str:
    """``bench/storage.md``: one row per (variant, crop)."""
    L = ["# Storage variants: fidelity, size, speed", "",
         f"Teacher maps of {fig['images']} training images at crops {fig['crops']} (points "
         f"{', '.join(fig['points'])}); loss norm `{fig['norm']}`; student maps: teacher map + rho·RMS·white noise, "
         f"rho ∈ {fig['student_noise_rho']}, and the student at initialisation (worst reported). Speeds: "
         "float32 MB of teacher output per CPU-second of one thread.",
         "", "| storage | crop | rel. error (ch.-norm.) | grad cosine (worst) | cosine: untrained student | "
             "grad rel. error | loss rel. error | zstd ratio | vs float16 | encode MB/s | decode MB/s |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in fig["variants"].items():
        for crop, r in v["crops"].items():
            L.append(f"| `{name}` | {crop} | {r['rel_error']:.2e} | {r['grad_cosine']:.6f} | "
                     f"{r['grad_cosine_by_student']['untrained']:.6f} | {r['grad_rel_error']:.2e} | "
                     f"{r['loss_rel_error']:.2e} | {r['zstd_ratio']:.2f} | {r['compression_vs_float16']:.2f}× | "
                     f"{r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} |")
    rec = fig["recommended"]
    L += ["", f"Recommended (smallest with gradient cosine ≥ {fig['min_cosine']} at every crop): `{rec['encoding']}` — "
              f"{rec['compression_vs_float16']:.2f}× smaller than float16, gradient cosine {rec['grad_cosine']:.6f}, "
              f"rel. error {rec['rel_error']:.2e}.", ""]
    return "\n".join(L)


@dataclasses.dataclass(frozen=True)
class FeedAssumption:
    """Throughputs a projection assumes (not measured here): a teacher producing ``teacher_images_per_s``
    images/s for the cache build, a student consuming ``student_samples_per_s`` samples/s, at ``crop`` px."""

    card: str
    teacher_images_per_s: float
    student_samples_per_s: float
    crop: int
    basis: str


# An RTX 4090 (165 TFLOPS dense fp16 tensor throughput) at ~30 % of peak: the DeepLabV3+ R101 teacher's forward
# at 513 px is 186 GFLOP and the R18 student's 85 GFLOP (torch.utils.flop_counter on the meta device), a
# training step ~3 forwards.
RTX_CLASS = FeedAssumption("RTX 4090", 250.0, 200.0, 513, "165 TFLOPS fp16 at ~30 % of peak; teacher forward "
                           "186 GFLOP, student step ~256 GFLOP at 513 px")


def feed_projection(fig: dict, sample_bytes: float, assume: FeedAssumption = RTX_CLASS) -> dict[str, dict]:
    """Per variant of ``fig`` (``storage_figures``): CPU cores to (a) encode the maps of
    ``assume.teacher_images_per_s`` images/s in a cache build and (b) decode ``assume.student_samples_per_s``
    samples/s in the DataLoader, from the measured MB/s per core at the largest crop measured;
    ``sample_bytes``: float32 bytes of one sample's targets at ``assume.crop`` (``cache.plan.model_target_specs``).
    Excludes image decoding, augmentation and the store's per-read cost (shard index, crc32c, file I/O)."""
    crop = str(max(int(c) for c in fig["crops"]))
    mb = sample_bytes / 1e6
    out = {}
    for name, v in fig["variants"].items():
        r = v["crops"][crop]
        out[name] = {"build_cores": assume.teacher_images_per_s * mb / r["encode_mb_s"],
                     "loader_cores": assume.student_samples_per_s * mb / r["decode_mb_s"],
                     "encode_mb_s": r["encode_mb_s"], "decode_mb_s": r["decode_mb_s"], "measured_crop": int(crop)}
    return out


def projection_markdown(proj: dict[str, dict], sample_bytes: float, assume: FeedAssumption = RTX_CLASS) -> str:
    """The projection as a Markdown table, its assumptions named."""
    L = [f"Cores for an {assume.card}-class card at {assume.crop} px ({sample_bytes / 1e6:.1f} MB of float32 targets "
         f"per sample). **Assumed, not measured**: teacher R = {assume.teacher_images_per_s:g} images/s, student "
         f"S = {assume.student_samples_per_s:g} samples/s ({assume.basis}). Measured: MB/s per core at "
         f"{next(iter(proj.values()))['measured_crop']} px.", "",
         "| storage | encode MB/s per core | decode MB/s per core | (a) build: cores for R "
         "| (b) DataLoader: cores for S |",
         "| --- | --- | --- | --- | --- |"]
    L += [f"| `{n}` | {p['encode_mb_s']:.0f} | {p['decode_mb_s']:.0f} | {p['build_cores']:.1f} "
          f"| {p['loader_cores']:.1f} |" for n, p in proj.items()]
    return "\n".join(L) + "\n"


def write_storage_bench(cfg, teacher, source, out_dir, *, crops=(64, 257), images: int = 8) -> dict:
    """``storage_figures`` on ``teacher`` (with its identity under ``teacher``), written atomically to
    ``<out_dir>/storage.json`` and ``storage.md``; returns the figures."""
    from attnfd_pipeline.utils import atomic_write_json, atomic_write_text

    fig = storage_figures(cfg, teacher, source, crops=crops, images=images)
    fig["teacher"] = teacher.info()
    sample_bytes = paper_sample_bytes(cfg)
    fig["feed_projection"] = {"assumption": dataclasses.asdict(RTX_CLASS), "sample_bytes": sample_bytes,
                              "variants": feed_projection(fig, sample_bytes)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "storage.json", fig)
    atomic_write_text(out_dir / "storage.md", storage_markdown(fig) + "\n## Feeding a GPU\n\n"
                      + projection_markdown(fig["feed_projection"]["variants"], sample_bytes))
    return fig


def paper_sample_bytes(cfg) -> int:
    """float32 bytes of one sample's cached points (``cache.points``) for the paper's teacher (DeepLabV3+
    ResNet-101) at ``RTX_CLASS.crop`` px, from the model config alone (meta device)."""
    from attnfd_pipeline.cache.plan import model_target_specs

    t = cfg.teacher
    paper = dataclasses.replace(
        cfg, teacher=dataclasses.replace(t, model=dataclasses.replace(t.model, name="deeplabv3plus_resnet101")),
        augment=dataclasses.replace(cfg.augment, crop_size=(RTX_CLASS.crop, RTX_CLASS.crop),
                                    base_size=max(cfg.augment.base_size, RTX_CLASS.crop)))
    specs = model_target_specs(paper, list(cfg.cache.points))
    return int(sum(4 * c * h * w for c, h, w in specs.values()))
