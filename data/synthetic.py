"""Procedurally generated street scenes: a small dataset that needs no download (demo, tests, smoke runs).

Each scene is a deterministic function of (seed_offset, index) (numpy Generator), drawn with vectorised numpy in
a few milliseconds. Eight classes that differ in shape and texture, not only colour: sky (top band, smooth
vertical gradient), building (blocks with a window grid), road (perspective trapezoid with dashed lane marks),
sidewalk (bands beside the road with a fine tile grid), vegetation (noisy blobs and grass, leafy noise texture),
car (rounded boxes with a dark window band and wheels), pole (thin shaded vertical bars), person (head ellipse,
torso, legs). Several classes draw their colours from shared palettes with per-instance jitter, and a global
illumination/tint change and pixel noise are applied, so colour alone is ambiguous. A small clutter patch per
scene may be labelled with the ignore label.

Training items get the same random crop as Cityscapes v3 (no resize); validation items are the full scenes.
"""
from __future__ import annotations

import random

import numpy as np

from data.common import SegmentationDataset, random_crop

CLASS_NAMES = ["road", "sidewalk", "building", "pole", "vegetation", "sky", "person", "car"]
ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = range(8)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 250
# Cityscapes colours of the same classes.
PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (153, 153, 153), (107, 142, 35), (70, 130, 180),
           (220, 20, 60), (0, 0, 142)]

# Colour families (RGB). Classes share several of them so that colour alone does not identify the class.
_GRAYS = [(70, 70, 72), (105, 105, 100), (140, 138, 135), (175, 172, 168), (55, 58, 64)]
_WARM = [(150, 120, 95), (170, 95, 80), (190, 170, 140), (120, 80, 60)]
_COOL = [(80, 110, 150), (110, 140, 175), (60, 80, 110)]
_GREENS = [(70, 110, 45), (95, 130, 60), (60, 85, 40), (120, 125, 55)]
_VIVID = [(180, 30, 40), (30, 60, 160), (200, 200, 210), (25, 25, 28), (200, 160, 30), (40, 120, 70)]
_SKY = _COOL + [(150, 170, 200), (170, 172, 178), (120, 125, 135)]
_ROAD = _GRAYS + [(95, 85, 80)]
_SIDEWALK = _GRAYS + _WARM
_BUILDING = _GRAYS + _WARM + _COOL
_VEG = _GREENS + [(120, 100, 50), (90, 110, 90)]
_POLE = _GRAYS + [(60, 90, 60), (40, 40, 40)]
_CLOTHES = _VIVID + _GRAYS + _WARM + _GREENS
_CAR = _VIVID + _GRAYS + _COOL + _GREENS


def _colour(rng: np.random.Generator, family: list, jitter: float = 18.0) -> np.ndarray:
    """A colour of the family with per-instance jitter (float32 [3])."""
    base = np.asarray(family[rng.integers(len(family))], dtype=np.float32)
    return base + rng.uniform(-jitter, jitter, 3).astype(np.float32)


def _clip_box(y0: float, y1: float, x0: float, x1: float, h: int, w: int):
    """Integer box clipped to the image, or None when empty; plus its local pixel-centre coordinates."""
    a, b = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), h)
    c, d = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), w)
    if a >= b or c >= d:
        return None
    ys = np.arange(a, b, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(c, d, dtype=np.float32)[None, :] + 0.5
    return (slice(a, b), slice(c, d)), ys, xs


def render_scene(rng: np.random.Generator, height: int, width: int, ignore_label: int = IGNORE_LABEL
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: ([H,W,3] uint8 RGB image, [H,W] uint8 label)."""
    H, W = height, width
    s = H / 128.0  # scale of texture periods relative to a 128-row scene
    img = np.empty((H, W, 3), dtype=np.float32)
    lbl = np.empty((H, W), dtype=np.uint8)
    ys_all = np.arange(H, dtype=np.float32)[:, None] + 0.5
    xs_all = np.arange(W, dtype=np.float32)[None, :] + 0.5

    # Sky: smooth vertical gradient over the upper part.
    g = int(H * rng.uniform(0.42, 0.58))  # ground line (horizon of the street)
    top, bottom = _colour(rng, _SKY, 12), _colour(rng, _SKY, 12) + 25.0
    t = (ys_all[:g] / max(g, 1))[:, :, None]  # [g,1,1]
    img[:g] = top + (bottom - top) * t
    lbl[:g] = SKY

    # Buildings: blocks along the street with a window grid (texture differs from everything else).
    x = -rng.uniform(0, W * 0.1)
    while x < W:
        bw = rng.uniform(0.1, 0.3) * W
        if rng.random() < 0.8:
            box = _clip_box(rng.uniform(0.05 * H, max(g - 0.12 * H, 0.06 * H)), g, x, x + bw, H, W)
            if box is not None:
                (sy, sx), ys, xs = box
                wall = _colour(rng, _BUILDING)
                px, py = rng.uniform(5, 9) * s, rng.uniform(6, 10) * s
                fx, fy = rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.6)
                windows = (((xs - x) % px) < fx * px) & (((ys - sy.start) % py) < fy * py)  # [h,w]
                shade = np.float32(rng.choice([0.45, 0.6, 1.45]))
                img[sy, sx] = wall * np.where(windows, shade, np.float32(1.0))[:, :, None]
                lbl[sy, sx] = BUILDING
        x += bw

    # Ground: road trapezoid towards a vanishing point, sidewalks beside it, grass beyond.
    n = H - g
    yg = ys_all[g:]  # [n,1]
    tg = (yg - g) / max(n, 1)  # 0 at the horizon, 1 at the bottom
    vx, bx = rng.uniform(0.3, 0.7) * W, rng.uniform(0.35, 0.65) * W
    cx = vx + (bx - vx) * tg  # road centre per row [n,1]
    hw = W * (0.03 + tg * rng.uniform(0.3, 0.5))  # road half-width per row
    sw = hw * rng.uniform(1.3, 1.6) + tg * W * 0.04  # outer edge of the sidewalk
    dx = np.abs(xs_all - cx)  # [n,W]
    road, walk = dx < hw, dx < sw
    grass_col, walk_col, road_col = _colour(rng, _VEG), _colour(rng, _SIDEWALK), _colour(rng, _ROAD)
    grass_tex = rng.random((n, W), dtype=np.float32) * np.float32(0.8) + np.float32(0.55)
    tile = max(3.0, rng.uniform(3, 5) * s)
    joints = (((xs_all - cx) % tile) < 1.0) | (((yg * (1 + 2 * tg)) % tile) < 1.0)
    walk_tex = np.where(joints, np.float32(0.7), np.float32(1.0))
    dash = (np.floor(np.log(yg - g + 2.0) * 7.0) % 2 == 0) & (dx < np.maximum(0.6, 0.012 * W * tg))
    road_tex = np.where(dash, np.float32(2.2), np.float32(1.0))
    ground = np.uint8(2) - walk.view(np.uint8) - road.view(np.uint8)  # 0 road, 1 sidewalk, 2 grass (road in walk)
    ground_tex = np.where(road, road_tex, np.where(walk, walk_tex, grass_tex))
    np.multiply(np.stack([road_col, walk_col, grass_col])[ground], ground_tex[:, :, None], out=img[g:])
    lbl[g:] = np.array([ROAD, SIDEWALK, VEGETATION], dtype=np.uint8)[ground]

    def road_at(y: float) -> tuple[float, float, float]:
        tt = (y - g) / max(n, 1)
        c = vx + (bx - vx) * tt
        h_ = W * 0.03 + (hw[-1, 0] - W * 0.03) * tt
        return c, h_, h_ * (sw[-1, 0] / max(hw[-1, 0], 1e-6))

    # Trees: noisy blobs standing on the ground line, leafy per-pixel texture.
    for _ in range(rng.integers(0, 4)):
        r = rng.uniform(0.06, 0.16) * H
        cy, cxx = g - rng.uniform(0.3, 1.0) * r, rng.uniform(0, W)
        box = _clip_box(cy - 1.3 * r, cy + 1.3 * r, cxx - 1.3 * r, cxx + 1.3 * r, H, W)
        if box is None:
            continue
        (sy, sx), ys, xs = box
        ang = np.arctan2(ys - cy, xs - cxx)
        k, ph = rng.integers(3, 7), rng.uniform(0, 2 * np.pi, 2)
        radius = r * (1 + 0.15 * np.sin(k * ang + ph[0]) + 0.08 * np.sin((2 * k + 1) * ang + ph[1]))
        m = (ys - cy) ** 2 + (xs - cxx) ** 2 < radius ** 2
        tex = (rng.random(m.shape, dtype=np.float32) * np.float32(0.9) + np.float32(0.5))[:, :, None]
        img[sy, sx] = np.where(m[:, :, None], _colour(rng, _VEG) * tex, img[sy, sx])
        lbl[sy, sx] = np.where(m, VEGETATION, lbl[sy, sx])

    # Objects on the ground, far to near: cars on the road, people on the sidewalk, poles at the road side.
    objects = []
    for _ in range(rng.integers(1, 4)):
        objects.append(("car", g + rng.uniform(0.15, 1.0) * n))
    for _ in range(rng.integers(0, 3)):
        objects.append(("person", g + rng.uniform(0.1, 1.0) * n))
    for _ in range(rng.integers(1, 4)):
        objects.append(("pole", g + rng.uniform(0.0, 0.5) * n))
    if rng.random() < 0.5:
        objects.append(("clutter", g + rng.uniform(0.2, 1.0) * n))
    objects.sort(key=lambda o: o[1])
    for kind, yb in objects:
        tt = (yb - g) / max(n, 1)
        c, rhw, shw = road_at(yb)
        if kind == "car":
            hc = (0.07 + 0.2 * tt) * H
            wc = hc * rng.uniform(1.4, 2.0)
            xc = c + rng.uniform(-0.7, 0.7) * rhw
            yc = yb - hc / 2
            box = _clip_box(yb - hc, yb + 0.05 * hc, xc - wc / 2, xc + wc / 2, H, W)
            if box is None:
                continue
            (sy, sx), ys, xs = box
            u, v = (xs - xc) / (wc / 2), (ys - yc) / (hc / 2)  # [-1,1] box coordinates
            body = (np.abs(u) ** 4 + np.abs(v) ** 4 < 1) & (v > -0.2)
            cabin = (np.abs(u) ** 4 / 0.4 + np.abs(v + 0.35) ** 4 / 0.05 < 1)
            window = cabin & (np.abs(u) < 0.5) & (v > -0.8) & (v < -0.25)
            wr = 0.28 * hc
            wheels = (((xs - (xc - 0.55 * wc / 2)) ** 2 + (ys - (yb - wr)) ** 2) < wr ** 2) | \
                     (((xs - (xc + 0.55 * wc / 2)) ** 2 + (ys - (yb - wr)) ** 2) < wr ** 2)
            m = body | cabin | wheels
            col = np.broadcast_to(_colour(rng, _CAR, 25), m.shape + (3,)).copy()
            col[window] = _colour(rng, _COOL, 10) * 0.6
            col[wheels] = np.float32(22.0)
            img[sy, sx] = np.where(m[:, :, None], col * (1.05 - 0.2 * (v[:, :, None] + 1) / 2), img[sy, sx])
            lbl[sy, sx] = np.where(m, CAR, lbl[sy, sx])
        elif kind == "person":
            hp = (0.1 + 0.28 * tt) * H
            side = rng.choice([-1.0, 1.0])
            xc = c + side * rng.uniform(1.05, 1.0 + max(shw / max(rhw, 1e-6) - 1.0, 0.1)) * rhw
            box = _clip_box(yb - hp, yb, xc - 0.2 * hp, xc + 0.2 * hp, H, W)
            if box is None:
                continue
            (sy, sx), ys, xs = box
            u, v = (xs - xc) / hp, (ys - (yb - hp)) / hp  # v: 0 at the head top, 1 at the feet
            head = (u / 0.07) ** 2 + ((v - 0.09) / 0.09) ** 2 < 1
            torso = (np.abs(u) < 0.13) & (v > 0.17) & (v < 0.58)
            legs = (np.abs(np.abs(u) - 0.06) < 0.04) & (v >= 0.58)
            m = head | torso | legs
            col = np.empty(m.shape + (3,), dtype=np.float32)
            col[...] = _colour(rng, _CLOTHES, 25)
            col[legs] = _colour(rng, _CLOTHES, 25)
            col[head] = _colour(rng, [(200, 160, 130), (150, 110, 80), (90, 60, 45)], 15)
            img[sy, sx] = np.where(m[:, :, None], col, img[sy, sx])
            lbl[sy, sx] = np.where(m, PERSON, lbl[sy, sx])
        elif kind == "pole":
            pw = max(1.0, rng.uniform(0.006, 0.012) * W)
            side = rng.choice([-1.0, 1.0])
            xc = c + side * rng.uniform(1.0, 1.2) * shw if rng.random() < 0.7 else rng.uniform(0, W)
            ytop = rng.uniform(0.03, 0.3) * H
            box = _clip_box(ytop, yb, xc - pw / 2, xc + pw / 2, H, W)
            if box is None:
                continue
            (sy, sx), ys, xs = box
            u = (xs - xc) / (pw / 2)  # [-1,1] across the bar: cylindrical shading
            col = _colour(rng, _POLE) * (1.25 - 0.5 * np.abs(u))[:, :, None]
            img[sy, sx] = np.broadcast_to(col, img[sy, sx].shape)
            lbl[sy, sx] = POLE
        else:  # clutter: an unlabelled thing (ignore label), e.g. a bin or a sign board
            a = (0.03 + 0.05 * tt) * H
            xc = rng.uniform(0, W)
            box = _clip_box(yb - 2 * a, yb, xc - a / 2, xc + a / 2, H, W)
            if box is None:
                continue
            (sy, sx), _, _ = box
            img[sy, sx] = _colour(rng, _VIVID + _GRAYS, 30)
            lbl[sy, sx] = ignore_label

    # Global illumination, tint and sensor noise.
    img *= np.float32(rng.uniform(0.6, 1.3)) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    # Uniform noise (cheaper to draw than Gaussian) with standard deviation sigma.
    sigma = np.float32(rng.uniform(2.0, 8.0) * np.sqrt(12.0))
    img += (rng.random((H, W, 3), dtype=np.float32) - np.float32(0.5)) * sigma
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8), lbl


class SyntheticStreets(SegmentationDataset):
    """`num_images` synthetic street scenes of `image_size` (H, W); scene i is drawn from the numpy generator
    seeded by (seed_offset, i). Training items (`train=True`) are random crops of `crop_size`."""

    name = "synthetic"
    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, num_images: int, image_size: tuple[int, int] = (96, 160), seed_offset: int = 0,
                 train: bool = True, crop_size: tuple[int, int] | None = None, channel_order: str = "RGB",
                 ignore_label: int = IGNORE_LABEL):
        super().__init__(train, crop_size, channel_order, ignore_label)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed_offset = int(seed_offset)
        self.names = [f"synthetic_{seed_offset}_{i:05d}" for i in range(int(num_images))]

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The full scene `index`: ([H,W,3] uint8 RGB, [H,W] uint8 label)."""
        rng = np.random.default_rng([self.seed_offset, index])
        return render_scene(rng, *self.image_size, ignore_label=self.ignore_label)

    def _load(self, index: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str]:
        image, label = self.scene(index)
        if self.train:
            image, label = random_crop(image, label, self.crop_size, rng, self.ignore_label, x_first=True)
        return image, label, self.names[index]


def export_folder(directory: str, num_train: int, num_val: int, image_size: tuple[int, int] = (96, 160),
                  ignore_label: int = IGNORE_LABEL) -> str:
    """Write the synthetic scenes as an ordinary folder dataset and a config that trains on it; returns the
    config's path.

    Layout: <directory>/{train,val}/{images,labels}/synthetic_<s>_<i>.png (RGB images, mode L labels holding class
    indices and `ignore_label`), the same scenes as `"dataset": "synthetic"` with that image size; the config
    (<directory>/config.json) is configs/demo.json with `"dataset": "folder"` pointing at these folders.
    """
    import json
    import os
    import re

    from PIL import Image

    for split, n, offset in (("train", num_train, 0), ("val", num_val, 1)):
        data = SyntheticStreets(n, image_size, seed_offset=offset, train=False, ignore_label=ignore_label)
        for kind in ("images", "labels"):
            os.makedirs(os.path.join(directory, split, kind), exist_ok=True)
        for i, name in enumerate(data.names):
            image, label = data.scene(i)
            Image.fromarray(image).save(os.path.join(directory, split, "images", name + ".png"))
            Image.fromarray(label).save(os.path.join(directory, split, "labels", name + ".png"))
    demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs", "demo.json")
    with open(demo) as f:
        cfg = json.load(f)
    cfg["dataset"] = "folder"
    cfg.pop("synthetic", None)
    cfg["ignore_label"] = ignore_label
    cfg["folder"] = {
        "train_images": os.path.join(directory, "train", "images"),
        "train_labels": os.path.join(directory, "train", "labels"),
        "val_images": os.path.join(directory, "val", "images"),
        "val_labels": os.path.join(directory, "val", "labels"),
        "class_names": CLASS_NAMES,
        "palette": [list(c) for c in PALETTE],
    }
    t = cfg["training"]
    t["data"]["labeled_samples"] = min(num_train, max(t["batch_size"], num_train // 10))
    cfg["utils"]["checkpoint_dir"] = os.path.join(directory, "run")
    path = os.path.join(directory, "config.json")
    text = json.dumps(cfg, indent=2)
    text = re.sub(r"\[\s*(\d+),\s*(\d+),\s*(\d+)\s*\]", r"[\1, \2, \3]", text)  # one line per colour
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic street scenes as a folder dataset "
                                                 "(images/ and labels/ per split) plus a config that trains on it.")
    parser.add_argument("--export", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--num-train", type=int, default=60)
    parser.add_argument("--num-val", type=int, default=10)
    parser.add_argument("--image-size", default="96,160", help="H,W of the scenes")
    args = parser.parse_args()
    h, w = (int(v) for v in args.image_size.split(","))
    config = export_folder(args.export, args.num_train, args.num_val, (h, w))
    print(f"wrote {args.num_train} training and {args.num_val} validation scenes under {args.export}\n"
          f"train on them with:  python3 trainSSL.py --config {config}")
