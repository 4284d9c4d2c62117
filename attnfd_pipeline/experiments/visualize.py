"""Attention pictures like the AttnFD paper's Fig. 1 (``attnfd visualize``).

For one validation image: the image, the raw feature map F and the refined map F'' = M_S(M_C(F) ⊗ F) ⊗ …
(docs/method.md "CBAM") at each distillation point, for the teacher (from its bundle: this loads the teacher, which is
fine for a picture) and for a trained student run (from its checkpoint; its F'' is the output of its
own trained CBAM — available when the run used ``attnfd``). Each map is the mean over channels,
min–max normalised and coloured (viridis-like), upsampled to the image size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from attnfd_pipeline.config import Config, load_config
from attnfd_pipeline.targets import raw_name
from attnfd_pipeline.errors import UserError


def _channel_mean(x: torch.Tensor) -> np.ndarray:
    return x[0].float().mean(0).cpu().numpy()


def _student_run(cfg: Config, run_dir: str | Path | None) -> Path:
    from attnfd_pipeline.runs import student_dir

    if run_dir is None:
        path = student_dir(cfg)
    else:
        path = Path(run_dir)
        if not path.is_dir() and (cfg.run_root / "student" / str(run_dir)).is_dir():
            path = cfg.run_root / "student" / str(run_dir)
    if not (path / "config.resolved.toml").is_file():
        raise FileNotFoundError(f"{path}: no student run there (train one with `attnfd student`, or pass --run "
                                f"with a folder under {cfg.run_root / 'student'})")
    return path


def attention_maps(cfg: Config, image_index: int, *, run_dir: str | Path | None = None, split: str | None = None,
                   checkpoint: str = "best") -> dict:
    """``{"image": (H, W, 3) uint8, "points": [...], "teacher"|"student": {"raw"|"refined": {point: (h, w)}}}``
    (a student's refined map is None when its run has no AttnFD CBAM)."""
    from attnfd_pipeline import augment
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.engine.checkpoint import load_checkpoint
    from attnfd_pipeline.models import build_model
    from attnfd_pipeline.distill import build_distiller, method_targets
    from attnfd_pipeline.teacher import bundle_path, load_teacher

    run = _student_run(cfg, run_dir)
    run_cfg = load_config(run / "config.resolved.toml")
    src = ImageSource.from_config(cfg, split or cfg.data.val_split)
    if not 0 <= image_index < len(src):
        raise UserError(f"image index {image_index} is out of range: split {split or cfg.data.val_split!r} has "
                         f"{len(src)} images")
    image, label = augment.val_transform(*src.load(image_index), cfg.augment.crop_size)
    x = augment.normalize(image)[None]
    teacher = load_teacher(bundle_path(cfg), "cpu")
    rs = run_cfg.student
    points = [p for p in rs.points if p in teacher.points]
    if not points:
        raise UserError(f"the student run's points {list(rs.points)} and the teacher's {list(teacher.points)} "
                         f"have none in common")
    t = teacher.targets(x, [*points, *(raw_name(p) for p in points)])

    nc = teacher.num_classes
    student = build_model(rs.model.name, nc, output_stride=rs.model.output_stride)
    distill = rs.alpha > 0
    shapes = teacher.target_specs(run_cfg.augment.crop_size, method_targets(rs)) if distill else {}
    distiller = build_distiller(student, rs, shapes, nc, distill=distill)
    ckpt = run / f"{checkpoint}.pt"
    if not ckpt.is_file():
        ckpt = run / "last.pt"
    distiller.load_state_dict(load_checkpoint(ckpt)["modules"])
    distiller.eval()
    with torch.no_grad():
        out = distiller(x)
        attn = distiller.methods["attnfd"].attention if "attnfd" in distiller.methods else None
        s_ref = {p: (_channel_mean(attn[p](out[p])) if attn is not None else None) for p in points}
    return {
        "image": image.permute(1, 2, 0).numpy().astype(np.uint8), "points": points, "run": str(run),
        "checkpoint": str(ckpt),
        "teacher": {"raw": {p: _channel_mean(t[raw_name(p)]) for p in points},
                    "refined": {p: _channel_mean(t[p]) for p in points}},
        "student": {"raw": {p: _channel_mean(out[p]) for p in points}, "refined": s_ref},
    }


def visualize(cfg: Config, image_index: int, out: str | Path, *, run_dir: str | Path | None = None,
              split: str | None = None, cell: int = 160) -> Path:
    """Write the Fig. 1-style grid (rows: points; columns: image, teacher F, teacher F'', student F,
    student F'') as a PNG; returns its path."""
    from attnfd_pipeline.experiments.plotting import colormap, image_grid

    maps = attention_maps(cfg, image_index, run_dir=run_dir, split=split)

    def tile(m):
        return None if m is None else colormap(m)

    rows = [[maps["image"], tile(maps["teacher"]["raw"][p]), tile(maps["teacher"]["refined"][p]),
             tile(maps["student"]["raw"][p]), tile(maps["student"]["refined"][p])] for p in maps["points"]]
    return image_grid(out, rows, cell=cell, row_titles=[f"point {p}" for p in maps["points"]],
                      col_titles=["image", "teacher F", "teacher F''", "student F", "student F''"],
                      title=f"val image {image_index}, student run {Path(maps['run']).name}")
