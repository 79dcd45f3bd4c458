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
from dataclasses import dataclass

import numpy as np

from data.common import SegmentationDataset, random_crop
from utils.errors import UserError

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
_SKIN = [(200, 160, 130), (150, 110, 80), (90, 60, 45)]

# Style "b": a dusk-lit town in pastel and autumn colours (families again shared between classes).
_B_DARK = [(48, 44, 60), (66, 58, 74), (84, 80, 96), (40, 46, 52)]
_B_PASTEL = [(225, 200, 165), (205, 170, 180), (175, 205, 210), (235, 225, 200), (200, 210, 160)]
_B_EARTH = [(160, 110, 85), (185, 135, 95), (125, 90, 70), (210, 160, 120)]
_B_AUTUMN = [(150, 140, 50), (175, 115, 40), (115, 135, 65), (95, 100, 45), (160, 80, 45)]
_B_LOUD = [(240, 110, 30), (30, 170, 170), (235, 235, 90), (120, 40, 130), (250, 250, 250), (15, 15, 20)]


@dataclass(frozen=True)
class Style:
    """Everything that makes the look of a scene: colour families, texture parameters, lighting and object
    proportions. Ranges are (low, high) of uniform draws. The label semantics are the same in every style."""

    sky: list
    road: list
    sidewalk: list
    building: list
    vegetation: list
    pole: list
    clothes: list
    car: list
    car_window: list
    skin: list
    clutter: list
    sky_gradient: float = 25.0                   # bottom minus top colour of the sky
    horizon: tuple = (0.42, 0.58)                # ground line, fraction of the height
    building_width: tuple = (0.1, 0.3)           # fraction of the width
    window_period: tuple = ((5, 9), (6, 10))     # (x, y) period of the window grid, rows of a 128-row scene
    window_fill: tuple = ((0.35, 0.6), (0.35, 0.6))  # (x, y) fraction of a period that is window
    window_shades: tuple = (0.45, 0.6, 1.45)     # window brightness relative to the wall
    road_width: tuple = (0.3, 0.5)               # road half-width at the bottom, fraction of the width
    sidewalk_width: tuple = (1.3, 1.6)           # outer sidewalk edge relative to the road half-width
    grass_block: int = 1                         # grass noise cell size in pixels (1: per-pixel noise)
    grass_texture: tuple = (0.55, 0.8)           # grass brightness: low + uniform(0, 1) * span
    tile: tuple = (3, 5)                         # sidewalk tile size, rows of a 128-row scene
    tile_joint: float = 0.7                      # brightness of the tile joints
    lane_mark: float = 2.2                       # brightness of the dashed lane marks
    asphalt_grain: float = 0.0                   # amplitude of per-pixel road grain (0: none)
    trees: tuple = (0, 4)                        # number of trees: integers(low, high)
    tree_radius: tuple = (0.06, 0.16)            # fraction of the height
    leaf_texture: tuple = (0.5, 0.9)             # leaf brightness: low + uniform(0, 1) * span
    car_height: tuple = (0.07, 0.2)              # car height = (a + b * depth) * H
    car_aspect: tuple = (1.4, 2.0)               # width / height
    car_power: int = 4                           # superellipse exponent of the body (larger: boxier)
    car_window_shade: float = 0.6
    wheel_grey: float = 22.0
    person_height: tuple = (0.1, 0.28)           # person height = (a + b * depth) * H
    torso_half_width: float = 0.13               # relative to the person's height
    pole_width: tuple = (0.006, 0.012)           # fraction of the width
    pole_shading: tuple = (1.25, 0.5)            # brightness = a - b * |distance from the axis|
    illumination: tuple = (0.6, 1.3)             # global brightness factor
    tint: tuple = (0.9, 1.1)                     # per-channel colour factor
    side_light: float = 0.0                      # brightness slope across the width, up to ±this (0: none)
    haze: float = 0.0                            # largest blend towards a haze colour at the horizon (0: none)
    haze_colour: tuple = (200.0, 190.0, 200.0)
    noise: tuple = (2.0, 8.0)                    # sensor noise standard deviation


STYLES = {
    # "a": the original scenes (stands in for GTA5 in the domain-adaptation benchmark)
    "a": Style(sky=_COOL + [(150, 170, 200), (170, 172, 178), (120, 125, 135)], road=_GRAYS + [(95, 85, 80)],
               sidewalk=_GRAYS + _WARM, building=_GRAYS + _WARM + _COOL, vegetation=_GREENS + [(120, 100, 50),
                                                                                              (90, 110, 90)],
               pole=_GRAYS + [(60, 90, 60), (40, 40, 40)], clothes=_VIVID + _GRAYS + _WARM + _GREENS,
               car=_VIVID + _GRAYS + _COOL + _GREENS, car_window=_COOL, skin=_SKIN, clutter=_VIVID + _GRAYS),
    # "b": other colours, textures, lighting and proportions (stands in for Cityscapes): dusk sky, pastel
    # buildings with dense narrow windows, wide grainy roads with dark lane marks, large bright-jointed tiles,
    # blotchy autumn vegetation, tall boxy cars, slim people, thick flat poles, side light and horizon haze.
    "b": Style(sky=[(235, 170, 120), (215, 140, 115), (240, 210, 165), (190, 180, 205), (160, 150, 175)],
               road=_B_DARK + [(110, 95, 90)], sidewalk=_B_EARTH + _B_PASTEL[:2] + [(150, 150, 160)],
               building=_B_PASTEL + _B_EARTH + _B_DARK[2:], vegetation=_B_AUTUMN,
               pole=[(220, 215, 70), (225, 225, 230), (95, 65, 45)] + _B_DARK[:2],
               clothes=_B_LOUD + _B_EARTH + _B_AUTUMN[:2], car=_B_LOUD + _B_PASTEL + _B_DARK,
               car_window=[(240, 220, 170), (200, 210, 230)], skin=[(230, 190, 160), (170, 120, 90)],
               clutter=_B_LOUD + _B_EARTH,
               sky_gradient=-35.0, horizon=(0.34, 0.48), building_width=(0.15, 0.4),
               window_period=((3, 5), (4, 6)), window_fill=((0.2, 0.35), (0.55, 0.75)),
               window_shades=(0.3, 0.75, 1.35), road_width=(0.4, 0.6), sidewalk_width=(1.15, 1.35),
               grass_block=4, grass_texture=(0.7, 0.6), tile=(6, 9), tile_joint=1.3, lane_mark=0.35,
               asphalt_grain=0.35, trees=(1, 5), tree_radius=(0.1, 0.2), leaf_texture=(0.75, 0.45),
               car_height=(0.1, 0.26), car_aspect=(1.05, 1.45), car_power=8, car_window_shade=1.1,
               wheel_grey=45.0, person_height=(0.13, 0.34), torso_half_width=0.09,
               pole_width=(0.014, 0.024), pole_shading=(1.1, 0.15), illumination=(0.7, 1.15),
               tint=(0.85, 1.15), side_light=0.45, haze=0.45, noise=(1.0, 4.0)),
}

# Rendered scenes are kept in memory when a whole dataset (images and labels) takes at most this many bytes.
CACHE_BYTES = 256 * 2 ** 20
# Third seed word of style "b" scenes (style "a" keeps the original (seed_offset, index) seeds).
STYLE_SEED = {"b": 11}


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


def _blocky_noise(rng: np.random.Generator, h: int, w: int, block: int) -> np.ndarray:
    """Uniform [0,1) noise [h,w] float32, constant over block x block cells (per pixel when block is 1)."""
    if block <= 1:
        return rng.random((h, w), dtype=np.float32)
    cells = rng.random((-(-h // block), -(-w // block)), dtype=np.float32)
    return np.repeat(np.repeat(cells, block, axis=0), block, axis=1)[:h, :w]


def render_scene(rng: np.random.Generator, height: int, width: int, ignore_label: int = IGNORE_LABEL,
                 style: str = "a") -> tuple[np.ndarray, np.ndarray]:
    """One street scene of `style` ("a" or "b"): ([H,W,3] uint8 RGB image, [H,W] uint8 label)."""
    st = STYLES[style]
    H, W = height, width
    s = H / 128.0  # scale of texture periods relative to a 128-row scene
    img = np.empty((H, W, 3), dtype=np.float32)
    lbl = np.empty((H, W), dtype=np.uint8)
    ys_all = np.arange(H, dtype=np.float32)[:, None] + 0.5
    xs_all = np.arange(W, dtype=np.float32)[None, :] + 0.5

    # Sky: smooth vertical gradient over the upper part.
    g = int(H * rng.uniform(*st.horizon))  # ground line (horizon of the street)
    top, bottom = _colour(rng, st.sky, 12), _colour(rng, st.sky, 12) + st.sky_gradient
    t = (ys_all[:g] / max(g, 1))[:, :, None]  # [g,1,1]
    img[:g] = top + (bottom - top) * t
    lbl[:g] = SKY

    # Buildings: blocks along the street with a window grid (texture differs from everything else).
    x = -rng.uniform(0, W * 0.1)
    (pxl, pxh), (pyl, pyh) = st.window_period
    (fxl, fxh), (fyl, fyh) = st.window_fill
    while x < W:
        bw = rng.uniform(*st.building_width) * W
        if rng.random() < 0.8:
            box = _clip_box(rng.uniform(0.05 * H, max(g - 0.12 * H, 0.06 * H)), g, x, x + bw, H, W)
            if box is not None:
                (sy, sx), ys, xs = box
                wall = _colour(rng, st.building)
                px, py = rng.uniform(pxl, pxh) * s, rng.uniform(pyl, pyh) * s
                fx, fy = rng.uniform(fxl, fxh), rng.uniform(fyl, fyh)
                windows = (((xs - x) % px) < fx * px) & (((ys - sy.start) % py) < fy * py)  # [h,w]
                shade = np.float32(rng.choice(st.window_shades))
                img[sy, sx] = wall * np.where(windows, shade, np.float32(1.0))[:, :, None]
                lbl[sy, sx] = BUILDING
        x += bw

    # Ground: road trapezoid towards a vanishing point, sidewalks beside it, grass beyond.
    n = H - g
    yg = ys_all[g:]  # [n,1]
    tg = (yg - g) / max(n, 1)  # 0 at the horizon, 1 at the bottom
    vx, bx = rng.uniform(0.3, 0.7) * W, rng.uniform(0.35, 0.65) * W
    cx = vx + (bx - vx) * tg  # road centre per row [n,1]
    hw = W * (0.03 + tg * rng.uniform(*st.road_width))  # road half-width per row
    sw = hw * rng.uniform(*st.sidewalk_width) + tg * W * 0.04  # outer edge of the sidewalk
    dx = np.abs(xs_all - cx)  # [n,W]
    road, walk = dx < hw, dx < sw
    grass_col, walk_col, road_col = _colour(rng, st.vegetation), _colour(rng, st.sidewalk), _colour(rng, st.road)
    grass_tex = _blocky_noise(rng, n, W, st.grass_block) * np.float32(st.grass_texture[1]) + \
        np.float32(st.grass_texture[0])
    tile = max(3.0, rng.uniform(*st.tile) * s)
    joints = (((xs_all - cx) % tile) < 1.0) | (((yg * (1 + 2 * tg)) % tile) < 1.0)
    walk_tex = np.where(joints, np.float32(st.tile_joint), np.float32(1.0))
    dash = (np.floor(np.log(yg - g + 2.0) * 7.0) % 2 == 0) & (dx < np.maximum(0.6, 0.012 * W * tg))
    road_tex = np.where(dash, np.float32(st.lane_mark), np.float32(1.0))
    if st.asphalt_grain > 0:
        road_tex = road_tex * (np.float32(1.0 - st.asphalt_grain / 2) +
                               np.float32(st.asphalt_grain) * rng.random((n, W), dtype=np.float32))
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
    for _ in range(rng.integers(*st.trees)):
        r = rng.uniform(*st.tree_radius) * H
        cy, cxx = g - rng.uniform(0.3, 1.0) * r, rng.uniform(0, W)
        box = _clip_box(cy - 1.3 * r, cy + 1.3 * r, cxx - 1.3 * r, cxx + 1.3 * r, H, W)
        if box is None:
            continue
        (sy, sx), ys, xs = box
        ang = np.arctan2(ys - cy, xs - cxx)
        k, ph = rng.integers(3, 7), rng.uniform(0, 2 * np.pi, 2)
        radius = r * (1 + 0.15 * np.sin(k * ang + ph[0]) + 0.08 * np.sin((2 * k + 1) * ang + ph[1]))
        m = (ys - cy) ** 2 + (xs - cxx) ** 2 < radius ** 2
        tex = (rng.random(m.shape, dtype=np.float32) * np.float32(st.leaf_texture[1]) +
               np.float32(st.leaf_texture[0]))[:, :, None]
        img[sy, sx] = np.where(m[:, :, None], _colour(rng, st.vegetation) * tex, img[sy, sx])
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
    p = st.car_power
    for kind, yb in objects:
        tt = (yb - g) / max(n, 1)
        c, rhw, shw = road_at(yb)
        if kind == "car":
            hc = (st.car_height[0] + st.car_height[1] * tt) * H
            wc = hc * rng.uniform(*st.car_aspect)
            xc = c + rng.uniform(-0.7, 0.7) * rhw
            yc = yb - hc / 2
            box = _clip_box(yb - hc, yb + 0.05 * hc, xc - wc / 2, xc + wc / 2, H, W)
            if box is None:
                continue
            (sy, sx), ys, xs = box
            u, v = (xs - xc) / (wc / 2), (ys - yc) / (hc / 2)  # [-1,1] box coordinates
            body = (np.abs(u) ** p + np.abs(v) ** p < 1) & (v > -0.2)
            cabin = (np.abs(u) ** p / 0.4 + np.abs(v + 0.35) ** p / 0.05 < 1)
            window = cabin & (np.abs(u) < 0.5) & (v > -0.8) & (v < -0.25)
            wr = 0.28 * hc
            wheels = (((xs - (xc - 0.55 * wc / 2)) ** 2 + (ys - (yb - wr)) ** 2) < wr ** 2) | \
                     (((xs - (xc + 0.55 * wc / 2)) ** 2 + (ys - (yb - wr)) ** 2) < wr ** 2)
            m = body | cabin | wheels
            col = np.broadcast_to(_colour(rng, st.car, 25), m.shape + (3,)).copy()
            col[window] = _colour(rng, st.car_window, 10) * st.car_window_shade
            col[wheels] = np.float32(st.wheel_grey)
            img[sy, sx] = np.where(m[:, :, None], col * (1.05 - 0.2 * (v[:, :, None] + 1) / 2), img[sy, sx])
            lbl[sy, sx] = np.where(m, CAR, lbl[sy, sx])
        elif kind == "person":
            hp = (st.person_height[0] + st.person_height[1] * tt) * H
            side = rng.choice([-1.0, 1.0])
            xc = c + side * rng.uniform(1.05, 1.0 + max(shw / max(rhw, 1e-6) - 1.0, 0.1)) * rhw
            box = _clip_box(yb - hp, yb, xc - 0.2 * hp, xc + 0.2 * hp, H, W)
            if box is None:
                continue
            (sy, sx), ys, xs = box
            u, v = (xs - xc) / hp, (ys - (yb - hp)) / hp  # v: 0 at the head top, 1 at the feet
            head = (u / 0.07) ** 2 + ((v - 0.09) / 0.09) ** 2 < 1
            torso = (np.abs(u) < st.torso_half_width) & (v > 0.17) & (v < 0.58)
            legs = (np.abs(np.abs(u) - 0.06) < 0.04) & (v >= 0.58)
            m = head | torso | legs
            col = np.empty(m.shape + (3,), dtype=np.float32)
            col[...] = _colour(rng, st.clothes, 25)
            col[legs] = _colour(rng, st.clothes, 25)
            col[head] = _colour(rng, st.skin, 15)
            img[sy, sx] = np.where(m[:, :, None], col, img[sy, sx])
            lbl[sy, sx] = np.where(m, PERSON, lbl[sy, sx])
        elif kind == "pole":
            pw = max(1.0, rng.uniform(*st.pole_width) * W)
            side = rng.choice([-1.0, 1.0])
            xc = c + side * rng.uniform(1.0, 1.2) * shw if rng.random() < 0.7 else rng.uniform(0, W)
            ytop = rng.uniform(0.03, 0.3) * H
            box = _clip_box(ytop, yb, xc - pw / 2, xc + pw / 2, H, W)
            if box is None:
                continue
            (sy, sx), ys, xs = box
            u = (xs - xc) / (pw / 2)  # [-1,1] across the bar: cylindrical shading
            col = _colour(rng, st.pole) * (st.pole_shading[0] - st.pole_shading[1] * np.abs(u))[:, :, None]
            img[sy, sx] = np.broadcast_to(col, img[sy, sx].shape)
            lbl[sy, sx] = POLE
        else:  # clutter: an unlabelled thing (ignore label), e.g. a bin or a sign board
            a = (0.03 + 0.05 * tt) * H
            xc = rng.uniform(0, W)
            box = _clip_box(yb - 2 * a, yb, xc - a / 2, xc + a / 2, H, W)
            if box is None:
                continue
            (sy, sx), _, _ = box
            img[sy, sx] = _colour(rng, st.clutter, 30)
            lbl[sy, sx] = ignore_label

    # Global illumination, tint, (style b: side light and haze at the horizon) and sensor noise.
    img *= np.float32(rng.uniform(*st.illumination)) * rng.uniform(*st.tint, 3).astype(np.float32)
    if st.side_light > 0:  # brighter on one side of the street
        slope = np.float32(rng.uniform(-st.side_light, st.side_light))
        img *= (np.float32(1.0) + slope * (xs_all / np.float32(W) - np.float32(0.5)))[:, :, None]
    if st.haze > 0:  # blend towards the haze colour, strongest at the horizon
        amount = np.float32(rng.uniform(0.3, 1.0) * st.haze)
        w_h = amount * np.exp(-np.abs(ys_all - np.float32(g)) / np.float32(0.15 * H))[:, :, None]  # [H,1,1]
        img += (np.asarray(st.haze_colour, dtype=np.float32) - img) * w_h
    # Uniform noise (cheaper to draw than Gaussian) with standard deviation sigma.
    sigma = np.float32(rng.uniform(*st.noise) * np.sqrt(12.0))
    img += (rng.random((H, W, 3), dtype=np.float32) - np.float32(0.5)) * sigma
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8), lbl


class SyntheticStreets(SegmentationDataset):
    """`num_images` synthetic street scenes of `image_size` (H, W) in `style` ("a" or "b"); scene i is drawn from
    the numpy generator seeded by (seed_offset, i) (style "b": (seed_offset, i, 11), so its scenes are not
    re-coloured copies of style "a"'s). Training items (`train=True`) are random crops of `crop_size`."""

    name = "synthetic"
    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, num_images: int, image_size: tuple[int, int] = (96, 160), seed_offset: int = 0,
                 train: bool = True, crop_size: tuple[int, int] | None = None, channel_order: str = "RGB",
                 ignore_label: int = IGNORE_LABEL, style: str = "a"):
        super().__init__(train, crop_size, channel_order, ignore_label)
        if style not in STYLES:
            raise UserError(f"synthetic.style is {style!r}; choose one of {', '.join(map(repr, STYLES))}.")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed_offset = int(seed_offset)
        self.style = style
        tag = "" if style == "a" else f"-{style}"
        self.names = [f"synthetic{tag}_{seed_offset}_{i:05d}" for i in range(int(num_images))]
        fits = len(self.names) * self.image_size[0] * self.image_size[1] * 4 <= CACHE_BYTES
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if fits else None

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The full scene `index`: ([H,W,3] uint8 RGB, [H,W] uint8 label), read-only. Rendered once and kept when
        the whole set fits in CACHE_BYTES (training draws every scene many times)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        key = [self.seed_offset, index] + ([] if self.style == "a" else [STYLE_SEED[self.style]])
        rng = np.random.default_rng(key)
        image, label = render_scene(rng, *self.image_size, ignore_label=self.ignore_label, style=self.style)
        image.flags.writeable = False
        label.flags.writeable = False
        if self._cache is not None:
            self._cache[index] = (image, label)
        return image, label

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
    cfg["utils"]["run_name"] = ""  # the run directory is <directory>/run itself (not run/config)
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
