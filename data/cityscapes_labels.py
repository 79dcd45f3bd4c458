"""Cityscapes label definitions: label id -> train id, class names and colours.

One lookup table (`ID_TO_TRAINID`, a 256-entry uint8 array) maps label-id images to train ids in one
indexing operation; every id that is not one of the 19 evaluated classes maps to the ignore label.
"""
from __future__ import annotations

import numpy as np

IGNORE_LABEL = 250

# (name, label id, train id or None, RGB colour) — the 34 ids of the official definition.
LABELS: list[tuple[str, int, int | None, tuple[int, int, int]]] = [
    ("unlabeled", 0, None, (0, 0, 0)),
    ("ego vehicle", 1, None, (0, 0, 0)),
    ("rectification border", 2, None, (0, 0, 0)),
    ("out of roi", 3, None, (0, 0, 0)),
    ("static", 4, None, (0, 0, 0)),
    ("dynamic", 5, None, (111, 74, 0)),
    ("ground", 6, None, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, None, (250, 170, 160)),
    ("rail track", 10, None, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, None, (180, 165, 180)),
    ("bridge", 15, None, (150, 100, 100)),
    ("tunnel", 16, None, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, None, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, None, (0, 0, 90)),
    ("trailer", 30, None, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
]

NUM_CLASSES = 19
CLASS_NAMES: list[str] = [name for name, _, tid, _ in sorted(
    (l for l in LABELS if l[2] is not None), key=lambda l: l[2])]
PALETTE: list[tuple[int, int, int]] = [col for _, _, tid, col in sorted(
    (l for l in LABELS if l[2] is not None), key=lambda l: l[2])]


def id_to_trainid_lut(ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """256-entry uint8 table: label id -> train id (ignore_label for everything not evaluated)."""
    lut = np.full(256, ignore_label, dtype=np.uint8)
    for _, lid, tid, _ in LABELS:
        if tid is not None:
            lut[lid] = tid
    return lut


ID_TO_TRAINID = id_to_trainid_lut()
