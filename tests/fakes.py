"""Test doubles shared by the test files and by the subprocesses they start.

A plain module, not a conftest: a killed build subprocess imports the fakes too (``sys.path.insert(0,
TESTS)`` then ``from fakes import ...``), and a conftest is not meant to be imported. The fixtures built on
these live in conftest.py.

The fake teacher and source are tiny: 5 images of 40–60 px, 32-px crops, K=2, shards of 2 images, a 4-conv
teacher whose B/E are at stride 16 and D/logits at stride 4.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

from attnfd_pipeline.config import AugmentConfig, CacheConfig, Config, dump_toml, load_config
from attnfd_pipeline.data.source import SampleSource
from attnfd_pipeline.utils import sha256_state_dict

TESTS = Path(__file__).parent


class FakeTeacher(nn.Module):
    """Deterministic frozen teacher: D (8 ch, stride 4, post-ReLU), B (16 ch, stride 16, pre-ReLU),
    E (8 ch, stride 16), logits (5 ch, stride 4); refined = parameter-free spatial gate."""

    def __init__(self, seed: int = 0, fail_at_call: int | None = None, poison: str | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=4, padding=1)
        self.e = nn.Conv2d(16, 8, 1)
        self.cls = nn.Conv2d(8, 5, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.requires_grad_(False)
        self.eval()
        self.fail_at_call, self.poison, self.calls = fail_at_call, poison, 0
        self.sha256 = sha256_state_dict(self.state_dict())

    def info(self) -> dict:
        return {"model": "fake", "cbam_mode": "parameter_free", "num_classes": 5, "sha256": self.sha256}

    @staticmethod
    def _gate(x):
        return x * torch.sigmoid(x.mean(1, keepdim=True) + x.amax(1, keepdim=True))

    @torch.no_grad()
    def targets(self, x, names):
        self.calls += 1
        if self.fail_at_call is not None and self.calls >= self.fail_at_call:
            raise RuntimeError("injected teacher failure")
        d = torch.relu(self.d(x))
        b = self.b(d)
        e = torch.relu(self.e(torch.relu(b)))
        raw = {"D": d, "B": b, "E": e}
        out = {}
        for n in names:
            if n == "logits":
                out[n] = self.cls(d)
            elif n.startswith("raw_"):
                out[n] = raw[n[4:]].clone()
            else:
                out[n] = self._gate(raw[n])
        if self.poison in out:
            out[self.poison][0, 0, 0, 0] = float("inf")
        return out

    def target_specs(self, crop_hw, names):
        calls = self.calls
        t = self.targets(torch.zeros(1, 3, *crop_hw), names)
        self.calls = calls
        return {k: tuple(v.shape[1:]) for k, v in t.items()}


class FakeSource(SampleSource):
    """Random uint8 images of varied sizes with 5-class labels."""

    def __init__(self, n: int = 5, seed: int = 0, slow_from: int | None = None):
        rng = np.random.default_rng(seed)
        self.ids = np.array([f"img_{i:03d}" for i in range(n)])
        self._images, self._labels = [], []
        for _ in range(n):
            h, w = (int(v) for v in rng.integers(40, 61, size=2))
            # smooth-ish images so blur/resize matter but stay cheap
            base = rng.integers(0, 256, size=(3, h // 4 + 1, w // 4 + 1), dtype=np.uint8)
            img = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)[:, :h, :w]
            self._images.append(torch.from_numpy(np.ascontiguousarray(img)))
            self._labels.append(torch.from_numpy(rng.integers(0, 5, size=(h, w), dtype=np.uint8)))
        self.slow_from = slow_from

    def __len__(self):
        return len(self.ids)

    def load(self, index):
        if self.slow_from is not None and index >= self.slow_from:
            time.sleep(3600)  # the subprocess is killed while it waits here
        return self._images[index].clone(), self._labels[index].clone()

    def identity(self):
        h = hashlib.sha256()
        for i, img in zip(self.ids, self._images):
            h.update(f"{i}:{tuple(img.shape)}:{hashlib.sha256(img.numpy().tobytes()).hexdigest()}".encode())
        return {"dataset": "fake", "split": "train", "count": len(self), "listing_sha256": h.hexdigest()}


def fake_cfg(root, **cache) -> Config:
    """The config of a cache of the fake teacher under ``root`` (cache fields overridable); the tiny
    demo-data config is conftest.make_cfg."""
    c = dict(root=str(root), K=2, points=("B", "E", "D"), shard_size=2, batch_size=3)
    c.update(cache)
    return Config(augment=AugmentConfig(crop_size=(32, 32), base_size=48, scale_min=0.75, scale_max=1.5),
                  cache=CacheConfig(**c))


def tree_bytes(d: Path, sub: str = "features.zarr") -> dict[str, bytes]:
    base = Path(d) / sub
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def cache_cli(*args):
    """`attnfd cache ...` in-process; with the cache_cli_env fixture it runs on the fake teacher and source."""
    import stages.cache

    return CliRunner().invoke(stages.cache.app, [str(a) for a in args])


def with_overrides(cfg, tmp_path, *overrides):
    """Same config, fresh runs root, plus overrides (caches and teacher stay shared)."""
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    return load_config(p, list(overrides))


def share_teacher(cfg, new):
    """Copy cfg's trained teacher into new's runs root, so new trains no teacher of its own."""
    shutil.copytree(cfg.teacher_dir, new.teacher_dir, dirs_exist_ok=True)


@contextlib.contextmanager
def interrupted_after(epochs: int):
    """Ctrl-C in ``engine.train.fit`` as the next epoch starts, after ``epochs`` epochs of this call: the call
    ends in RunInterrupted (swallowed here) with last.pt and the log of the finished epochs, as a run a user
    interrupts. Yields a dict whose "interrupted" says whether the call got that far (a run with fewer
    epochs left ends normally)."""
    import attnfd_pipeline.engine.train as train

    real, state = train.train_one_epoch, {"epochs": 0, "interrupted": False}

    def one_epoch(*args, **kwargs):
        if state["epochs"] >= epochs:
            raise KeyboardInterrupt
        state["epochs"] += 1
        return real(*args, **kwargs)

    train.train_one_epoch = one_epoch
    try:
        yield state
    except train.RunInterrupted:
        state["interrupted"] = True
    finally:
        train.train_one_epoch = real


# synthetic result.json files of finished runs (the report and the curves read them)
CLASSES = ["background", "circle", "square"]


def write_student_result(root, *, method="attnfd", alpha=2.0, seed=0, miou=0.6, acc=0.9, K=4, norm="batch",
                         points=("B", "E", "D"), mode="cached", teacher_mode="inpath", per_class=None,
                         model="deeplabv3plus_resnet18", seed_order="cycle"):
    name = f"{method}_a{alpha:g}_{norm}_{'-'.join(points)}_{mode}_K{K}_{teacher_mode}_s{seed}"
    d = root / "student" / name
    d.mkdir(parents=True)
    distilled = alpha > 0
    rec = {"run": name, "model": model, "method": method if distilled else "none",
           "methods": method.split("+") if distilled else [], "alpha": alpha, "norm": norm, "points": list(points),
           "mode": mode, "seed": seed, "K": K, "teacher": {"cbam_mode": teacher_mode} if distilled else None,
           "final_miou": miou, "final_pixel_acc": acc, "best_miou": miou,
           "per_class_iou": per_class if per_class is not None else [miou, miou, None], "class_names": CLASSES,
           "train_seconds": 1.0, "epochs": 1}
    if seed_order is not None:  # None: a result.json that does not record the order
        rec["seed_order"] = seed_order
    (d / "result.json").write_text(json.dumps(rec))


def write_teacher_result(root, miou=0.8, mode="inpath"):
    d = root / "teacher"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"miou": miou, "pixel_acc": 0.95, "seconds": 3.0, "epochs": 1}))
    (d / "teacher_bundle.json").write_text(json.dumps({"model": "deeplabv3plus_resnet101", "cbam_mode": mode,
                                                       "metrics": {"per_class_iou": [0.9, 0.8, 0.7]}}))
