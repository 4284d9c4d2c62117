"""One picture of `attnfd predict`'s output: a row per image — image | label | prediction — at one height.

    python scripts/predict_picture.py --config configs/demo.toml --pred /tmp/pred --out docs/img/predict_demo.png

Rows are the predicted masks in --pred (``<id>.png``) whose id is in the config's val split; the label is the
dataset's, coloured with the same palette.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from attnfd_pipeline.config import load_config
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.inference import dataset_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--pred", type=Path, required=True, help="folder of predicted <id>.png masks")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--height", type=int, default=128, help="row height in pixels")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    src = ImageSource.from_config(cfg, cfg.data.val_split)
    palette = dataset_info(cfg).palette_array()
    index = {str(i): k for k, i in enumerate(src.ids)}
    rows = []
    for mask_path in sorted(args.pred.glob("*.png")):
        if mask_path.stem not in index:
            continue
        image, label = src.load(index[mask_path.stem])
        pred = np.asarray(Image.open(mask_path))
        tiles = [image.permute(1, 2, 0).numpy(), palette[label.numpy()], palette[pred]]
        rows.append([_fit(t, args.height, nearest=k > 0) for k, t in enumerate(tiles)])
    if not rows:
        raise SystemExit(f"{args.pred}: no <id>.png of the {cfg.data.val_split} split")
    width = max(sum(t.width for t in r) for r in rows) + 8
    head = 16
    canvas = Image.new("RGB", (width, head + len(rows) * (args.height + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for x, text in zip((4, 4 + rows[0][0].width + 4, 4 + rows[0][0].width + rows[0][1].width + 8),
                       ("image", "label", "prediction")):
        draw.text((x, 2), text, fill="black")
    for r, tiles in enumerate(rows):
        x = 4
        for t in tiles:
            canvas.paste(t, (x, head + r * (args.height + 4)))
            x += t.width + 4
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, optimize=True)
    print(f"{args.out}: {len(rows)} rows, {args.out.stat().st_size / 1e3:.0f} kB")


def _fit(arr: np.ndarray, height: int, *, nearest: bool) -> Image.Image:
    im = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))
    w = max(1, round(im.width * height / im.height))
    return im.resize((w, height), Image.NEAREST if nearest else Image.BILINEAR)


if __name__ == "__main__":
    main()
