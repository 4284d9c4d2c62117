"""The embedded demo dataset: procedurally generated scenes in the exact Pascal VOC layout.

``generate_demo(out_dir)`` writes ``JPEGImages/*.jpg`` (quality 95), palette
``SegmentationClass/*.png``, ``ImageSets/Segmentation/{train,val}.txt`` and ``demo.json``.

The task is meant to need model capacity: 10 foreground classes that differ by *shape and
texture* (disc, ring, square, triangle, cross, star, bar, crescent, hexagon, heart; each with its
own texture family), while their colour distributions overlap (each class's hue is jittered over
its neighbours', saturation and value are shared), so colour alone does not decide the class.
Scenes have 1-4 objects at 20-65 % of the image side, random rotation and aspect, occlusion (the
label is the top-most object), background clutter (small blobs and thin lines labelled
background), textured backgrounds, mild global photometric variation, sensor noise and JPEG
compression. A 1-px band along label edges is 255 (ignore), like VOC's boundary.

The difficulty fits 2-core CPU budgets (``GENERATOR_VERSION`` names it in the dataset's metadata):
textures ``TEX`` = 1.8x coarser than 3-9 px periods, few and large objects, hue jitter +-0.12 turn and
light clutter. Textures finer than the 64-px training crops resolve, or many tiny objects, leave
from-scratch models at ~10 % mIoU after several epochs — a background-prediction problem that shows
neither capacity nor training budget (docs/calibration.md).

Determinism: image ``index`` of split ``split_id`` (train 0, val 1) uses
``np.random.default_rng(SeedSequence([seed, split_id, index]))``, so the bytes do not depend on
the number of worker processes or the order of work.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
from pathlib import Path
from typing import Union

import numpy as np

from .datasets import DEMO_CLASS_NAMES, DEMO_INFO, DEMO_PALETTE, DataError
from .io import atomic_write_bytes, write_jpeg, write_palette_png
from attnfd_pipeline.errors import UserError

__all__ = [
    "GENERATOR_VERSION",
    "DEMO_N_TRAIN",
    "DEMO_N_VAL",
    "DEMO_CLASS_NAMES",
    "DEMO_PALETTE",
    "DEMO_INFO",
    "generate_demo",
    "render_sample",
    "demo_is_complete",
]

GENERATOR_VERSION = 2
# Default split sizes. 400 val images: short students need a quiet yardstick (the same three checkpoints
# score 13.43 ± 0.89 % mIoU on 100 val images, 12.86 ± 0.17 % on 400: with 100 the seed spread is mostly
# evaluation noise). Images are seeded by (seed, split, index), so a split's size never changes the
# images of the other split, nor the first images of its own.
DEMO_N_TRAIN = 500
DEMO_N_VAL = 400
JPEG_QUALITY = 95
SPLITS = DEMO_INFO.splits  # split_id = position

NUM_FG = len(DEMO_CLASS_NAMES) - 1
TEX = 1.8  # texture scale: periods survive the ~0.5x downscale of a 64-px crop
HUE_JITTER = 0.12  # each class's hue +- this: overlaps its neighbours, so colour is a partial cue


# --------------------------------------------------------------------------------------------
# Small vectorised helpers
# --------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (h in turns) -> float32 RGB in [0, 1]."""
    h = h % 1.0
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb, dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise in [0, 1]: a random grid with spacing ``cell`` px, bilinearly upsampled."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    oy, ox = rng.random(2) * 0.999
    ys = (np.arange(h, dtype=np.float32) + 0.5) / cell + oy
    xs = (np.arange(w, dtype=np.float32) + 0.5) / cell + ox
    my = np.maximum(0.0, 1.0 - np.abs(ys[:, None] - np.arange(gh, dtype=np.float32)[None, :]))
    mx = np.maximum(0.0, 1.0 - np.abs(xs[:, None] - np.arange(gw, dtype=np.float32)[None, :]))
    return (my @ grid @ mx.T).astype(np.float32)


def _square_wave(x: np.ndarray, sharp: float = 1.6) -> np.ndarray:
    return np.clip(0.5 + sharp * np.sin(x), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Shapes: implicit functions of local, rotated, unit-radius coordinates (u, v)
# --------------------------------------------------------------------------------------------


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """``p`` in [0, 1) is a per-object shape parameter (thickness, inner radius...)."""
    r2 = u * u + v * v
    if cls == 1:  # disc
        return r2 <= 1.0
    if cls == 2:  # ring
        ri = 0.45 + 0.17 * p
        return (r2 <= 1.0) & (r2 >= ri * ri)
    if cls == 3:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if cls == 4:  # equilateral triangle, circumradius 1 (apex at +v)
        m = np.ones(u.shape, dtype=bool)
        for a in (math.pi / 2 + math.pi, math.pi / 2 + math.pi + 2 * math.pi / 3, math.pi / 2 + math.pi - 2 * math.pi / 3):
            m &= u * math.cos(a) + v * math.sin(a) <= 0.5
        return m
    if cls == 5:  # cross
        w = 0.24 + 0.1 * p
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= 0.95)) | ((av <= w) & (au <= 0.95))
    if cls == 6:  # five-pointed star
        theta = np.arctan2(v, u) + math.pi / 2
        sector = 2 * math.pi / 5
        phi = np.mod(theta, sector) - sector / 2
        tri = 1.0 - np.abs(phi) / (sector / 2)
        return np.sqrt(r2) <= 0.4 + 0.6 * tri**1.5
    if cls == 7:  # bar (stadium): distance to the segment [-0.7, 0.7] x {0}
        w = 0.22 + 0.1 * p
        du = np.maximum(np.abs(u) - (1.0 - w), 0.0)
        return du * du + v * v <= w * w
    if cls == 8:  # crescent
        off = 0.35 + 0.2 * p
        return (r2 <= 1.0) & ((u - off) ** 2 + v * v >= 0.82**2)
    if cls == 9:  # hexagon
        m = np.ones(u.shape, dtype=bool)
        for a in (0.0, math.pi / 3, 2 * math.pi / 3):
            m &= np.abs(u * math.cos(a) + v * math.sin(a)) <= 0.87
        return m
    if cls == 10:  # heart (upright in the local frame)
        x = u * 1.15
        y = -v * 1.15 + 0.12
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise UserError(cls)


# --------------------------------------------------------------------------------------------
# Textures: t in [0, 1] in pixel units of the rotated object frame (pu, pv)
# --------------------------------------------------------------------------------------------


def _texture(cls: int, rng: np.random.Generator, pu: np.ndarray, pv: np.ndarray, radius: float) -> np.ndarray:
    q = rng.random(3)  # always three draws, whatever the class, to keep the stream simple
    phase = float(q[0]) * 2 * math.pi
    if cls == 1:  # fine stripes along the object's u axis
        period = TEX * (5.0 + 2.0 * q[1])
        return _square_wave(2 * math.pi * pv / period + phase)
    if cls == 2:  # checkerboard
        c = TEX * (3.0 + 2.0 * q[1])
        return (np.floor(pu / c + q[2]) + np.floor(pv / c + q[1])) % 2
    if cls == 3:  # polka dots
        period = TEX * (6.0 + 3.0 * q[1])
        fu = np.mod(pu / period + q[2], 1.0) - 0.5
        fv = np.mod(pv / period + q[1], 1.0) - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    if cls == 4:  # very fine diagonal stripes
        period = TEX * (3.5 + 1.5 * q[1])
        return _square_wave(2 * math.pi * (pu + pv) / (math.sqrt(2) * period) + phase)
    if cls == 5:  # concentric rings around the object centre
        period = TEX * (4.0 + 2.0 * q[1])
        return _square_wave(2 * math.pi * np.sqrt(pu * pu + pv * pv) / period + phase)
    if cls == 6:  # blotchy noise
        n = _smooth_noise(rng, pu.shape[0], pu.shape[1], TEX * (2.5 + 1.5 * q[1]))
        return np.clip((n - 0.5) * 2.8 + 0.5, 0.0, 1.0)
    if cls == 7:  # coarse bands across the long axis
        period = TEX * (8.0 + 4.0 * q[1])
        return _square_wave(2 * math.pi * pu / period + phase, sharp=3.0)
    if cls == 8:  # smooth gradient across the object
        return np.clip(0.5 + pu / (1.6 * max(radius, 1.0)) * (0.8 + 0.4 * q[1]), 0.0, 1.0)
    if cls == 9:  # grid of thin lines (cross-hatch)
        period = TEX * (5.0 + 2.0 * q[1])
        a = np.abs(np.sin(math.pi * pu / period + phase)) < 0.38
        b = np.abs(np.sin(math.pi * pv / period + q[2] * math.pi)) < 0.38
        return (a | b).astype(np.float32)
    if cls == 10:  # 4-px speckle
        h, w = pu.shape
        cells = rng.random(((h + 3) // 4, (w + 3) // 4), dtype=np.float32) < 0.5
        return np.repeat(np.repeat(cells, 4, axis=0), 4, axis=1)[:h, :w].astype(np.float32)
    raise UserError(cls)


# --------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1 = _hsv(rng.random(), rng.uniform(0.0, 0.75), rng.uniform(0.2, 0.9))
    other = _hsv(rng.random(), rng.uniform(0.0, 0.75), rng.uniform(0.2, 0.9))
    c2 = c1 + (other - c1) * rng.uniform(0.25, 0.7)
    kind = int(rng.integers(5))
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    ang = rng.uniform(0, math.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    if kind == 0:  # smooth noise
        t = _smooth_noise(rng, h, w, rng.uniform(8.0, 28.0))
    elif kind == 1:  # linear gradient
        d = xs * ca + ys * sa
        t = (d - d.min()) / max(float(d.max() - d.min()), 1.0)
    elif kind == 2:  # stripes, random orientation / period
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xs * ca + ys * sa) / rng.uniform(5.0, 22.0) + rng.uniform(0, 6.3))
    elif kind == 3:  # large rotated checker
        c = rng.uniform(8.0, 20.0)
        t = ((np.floor((xs * ca + ys * sa) / c) + np.floor((-xs * sa + ys * ca) / c)) % 2).astype(np.float32)
    else:  # near-flat with low-frequency shading
        t = 0.5 + 0.3 * (_smooth_noise(rng, h, w, rng.uniform(20.0, 40.0)) - 0.5)
    t = np.broadcast_to(t, (h, w)).astype(np.float32)
    return c1[None, None, :] * (1.0 - t[..., None]) + c2[None, None, :] * t[..., None]


def _clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Small blobs and thin lines on the background (label stays 0)."""
    h, w, _ = img.shape
    side = min(h, w)
    for _ in range(int(rng.integers(2, 7))):
        kind = rng.random()
        col = _hsv(rng.random(), rng.uniform(0.0, 0.9), rng.uniform(0.15, 0.95))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        ang = rng.uniform(0, math.pi)
        ca, sa = math.cos(ang), math.sin(ang)
        if kind < 0.6:  # blob
            ra = rng.uniform(0.015, 0.045) * side
            rb = ra * rng.uniform(0.45, 1.0)
            ext = ra + 1.0
        else:  # line segment
            half = rng.uniform(0.08, 0.25) * side
            thick = rng.uniform(0.6, 1.7)
            ext = half + thick + 1.0
        x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 1, w)
        y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 1, h)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        pu, pv = dx * ca + dy * sa, -dx * sa + dy * ca
        if kind < 0.6:
            m = (pu / ra) ** 2 + (pv / rb) ** 2 <= 1.0
        else:
            m = (np.abs(pv) <= thick / 2) & (np.abs(pu) <= half)
        img[y0:y1, x0:x1][m] = col


def _object_colours(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """Two colours per object. Each class has a preferred hue, but the jitter (+-0.22 turn)
    spans about four neighbouring classes, and saturation/value are shared by all."""
    hue = (cls - 1) / NUM_FG + rng.uniform(-HUE_JITTER, HUE_JITTER)
    sat = rng.uniform(0.3, 0.95)
    val = rng.uniform(0.35, 0.95)
    hue2 = hue + rng.uniform(-0.1, 0.1)
    sat2 = min(1.0, sat * rng.uniform(0.5, 1.15))
    val2 = val * rng.uniform(0.3, 0.65) if val > 0.6 else min(1.0, val + rng.uniform(0.25, 0.45))
    c1, c2 = _hsv(hue, sat, val), _hsv(hue2, sat2, val2)
    if rng.random() < 0.5:
        c1, c2 = c2, c1
    return c1, c2


def render_sample(seed: int, split_id: int, index: int, min_size: int = 96, max_size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 (H, W, 3) RGB, label uint8 (H, W)); deterministic in
    (seed, split_id, index)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(split_id), int(index)]))
    h = int(rng.integers(min_size, max_size + 1))
    w = int(rng.integers(min_size, max_size + 1))
    side = min(h, w)
    img = _background(rng, h, w)
    _clutter(rng, img)
    label = np.zeros((h, w), dtype=np.uint8)

    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, NUM_FG + 1))
        radius = 0.5 * side * rng.uniform(0.20, 0.65)  # object size 20-65 % of the side
        cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
        ang = rng.uniform(0, 2 * math.pi)
        ax, ay = rng.uniform(0.85, 1.15, size=2)
        shape_p = float(rng.random())
        shade_dir = rng.uniform(0, 2 * math.pi)
        shade_amp = rng.uniform(0.0, 0.25)
        contrast = rng.uniform(0.55, 1.0)
        c1, c2 = _object_colours(rng, cls)

        ext = radius * 1.3 * max(ax, ay) + 2.0
        x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 1, w)
        y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 1, h)
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        ca, sa = math.cos(ang), math.sin(ang)
        pu = dx * ca + dy * sa  # (hb, wb) via broadcasting
        pv = -dx * sa + dy * ca
        mask = _shape_mask(cls, pu / (radius * ax), pv / (radius * ay), shape_p)
        t = np.broadcast_to(_texture(cls, rng, pu, pv, radius), mask.shape)
        t = 0.5 + (t - 0.5) * contrast
        shade = 1.0 + shade_amp * (pu * math.cos(shade_dir) + pv * math.sin(shade_dir)) / max(radius, 1.0)
        col = (c1[None, None, :] * (1.0 - t[..., None]) + c2[None, None, :] * t[..., None]) * shade[..., None]
        img[y0:y1, x0:x1][mask] = col[mask]
        label[y0:y1, x0:x1][mask] = cls

    # mild global photometric variation, optional slight blur, sensor noise
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * rng.uniform(0.8, 1.2) + mean + rng.uniform(-0.08, 0.08)
    img = img * rng.uniform(0.93, 1.07, size=3).astype(np.float32)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    if rng.random() < 0.5:  # [1, 2, 1] / 4 separable blur
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
        img = (img[:, :-2] + 2 * img[:, 1:-1] + img[:, 2:]) / 4
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.0, 0.03)
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    # 1-px ignore band along label edges (the pixel before each horizontal/vertical change)
    band = np.zeros((h, w), dtype=bool)
    band[:, :-1] |= label[:, :-1] != label[:, 1:]
    band[:-1, :] |= label[:-1, :] != label[1:, :]
    label[band] = 255
    return image, label


# --------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------

_ID_RX = re.compile(r"^(train|val)_\d{5,}$")


def _sample_id(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def _make_one(task: tuple) -> bool:
    out_dir, seed, split_id, index, min_size, max_size, skip_existing = task
    sid = _sample_id(SPLITS[split_id], index)
    img_path = os.path.join(out_dir, "JPEGImages", sid + ".jpg")
    lbl_path = os.path.join(out_dir, "SegmentationClass", sid + ".png")
    if skip_existing and os.path.isfile(img_path) and os.path.isfile(lbl_path):
        return False
    image, label = render_sample(seed, split_id, index, min_size, max_size)
    write_jpeg(img_path, image.transpose(2, 0, 1), quality=JPEG_QUALITY)
    write_palette_png(lbl_path, label, DEMO_PALETTE)
    return True


def _meta(seed: int, n_train: int, n_val: int, min_size: int, max_size: int, complete: bool) -> dict:
    return {
        "generator": "attnfd_pipeline.data.demo",
        "version": GENERATOR_VERSION,
        "dataset": "demo",
        "layout": "voc",
        "params": {
            "seed": seed,
            "n_train": n_train,
            "n_val": n_val,
            "min_size": min_size,
            "max_size": max_size,
            "jpeg_quality": JPEG_QUALITY,
        },
        "class_names": list(DEMO_CLASS_NAMES),
        "palette": [list(c) for c in DEMO_PALETTE],
        "complete": complete,
    }


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write_bytes(path, data)


def _write_meta(path: Path, meta: dict) -> None:
    _write_if_changed(path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _all_ids(n_train: int, n_val: int) -> dict[str, list[str]]:
    return {"train": [_sample_id("train", i) for i in range(n_train)], "val": [_sample_id("val", i) for i in range(n_val)]}


def _files_present(out: Path, ids: dict[str, list[str]]) -> bool:
    for split, lst in ids.items():
        if not (out / "ImageSets" / "Segmentation" / f"{split}.txt").is_file():
            return False
        for sid in lst:
            if not (out / "JPEGImages" / f"{sid}.jpg").is_file() or not (out / "SegmentationClass" / f"{sid}.png").is_file():
                return False
    return True


def demo_is_complete(out_dir: Union[str, os.PathLike], *, seed: int = 0, n_train: int = DEMO_N_TRAIN,
                     n_val: int = DEMO_N_VAL, min_size: int = 96, max_size: int = 160) -> bool:  # fmt: skip
    """True when ``out_dir`` holds a finished demo dataset generated with these parameters."""
    out = Path(out_dir)
    meta = _read_meta(out / "demo.json")
    return meta == _meta(seed, n_train, n_val, min_size, max_size, True) and _files_present(out, _all_ids(n_train, n_val))


def generate_demo(
    out_dir: Union[str, os.PathLike],
    *,
    seed: int = 0,
    n_train: int = DEMO_N_TRAIN,
    n_val: int = DEMO_N_VAL,
    min_size: int = 96,
    max_size: int = 160,
    workers: int = 2,
) -> Path:
    """Write the demo dataset (VOC layout) into ``out_dir`` and return its path.

    Same parameters -> byte-identical files, whatever ``workers`` is. When ``demo.json`` already
    records these parameters as complete, nothing is rewritten (missing files are re-created).
    Refuses to write into a non-empty folder that is not a demo dataset."""
    if not (8 <= min_size <= max_size):
        raise UserError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    if n_train < 0 or n_val < 0:
        raise UserError("n_train and n_val must be >= 0")
    seed = int(seed)
    out = Path(out_dir).expanduser().resolve()
    meta_path = out / "demo.json"
    want = _meta(seed, n_train, n_val, min_size, max_size, True)
    ids = _all_ids(n_train, n_val)

    if out.exists() and not out.is_dir():
        raise DataError(out, f"{out} exists and is not a folder")
    existing = _read_meta(meta_path) if meta_path.exists() else None
    if existing is None and out.exists() and any(out.iterdir()):
        raise DataError(out, f"refusing to write the demo dataset into {out}: the folder is not empty and has no demo.json")
    if existing is not None and existing.get("generator") != want["generator"]:
        raise DataError(meta_path, f"{meta_path} was not written by the demo generator; refusing to overwrite {out}")

    same = existing == want
    if same and _files_present(out, ids):
        return out  # idempotent: nothing to do

    out.mkdir(parents=True, exist_ok=True)
    if not same:
        # mark as in progress first: an interrupted run is never mistaken for a finished one
        _write_meta(meta_path, _meta(seed, n_train, n_val, min_size, max_size, False))
        _remove_stale(out, ids)
    tasks = [
        (str(out), seed, split_id, i, int(min_size), int(max_size), same)
        for split_id, split in enumerate(SPLITS)
        for i in range(len(ids[split]))
    ]
    _run_tasks(tasks, workers)
    for split in SPLITS:
        _write_if_changed(out / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{s}\n" for s in ids[split]).encode())
    _write_meta(meta_path, want)  # commit record, written last
    return out


def _remove_stale(out: Path, ids: dict[str, list[str]]) -> None:
    keep = {s for lst in ids.values() for s in lst}
    for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
        folder = out / sub
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            stem = f.name[: -len(ext)] if f.name.endswith(ext) else None
            if stem and _ID_RX.match(stem) and stem not in keep:
                f.unlink()


def _run_tasks(tasks: list[tuple], workers: int) -> None:
    workers = max(1, min(int(workers or 1), os.cpu_count() or 1, len(tasks)))
    if workers == 1 or len(tasks) < 4 * workers:
        for t in tasks:
            _make_one(t)
        return
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    chunk = max(1, len(tasks) // (workers * 8))
    with ctx.Pool(workers) as pool:
        for _ in pool.imap_unordered(_make_one, tasks, chunksize=chunk):
            pass

