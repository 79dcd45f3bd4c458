"""Augmentations of SPEC 5.1 on small CPU tensors, with hand-worked or independently computed expectations."""
import ast
import math
import os
import pathlib
import random
import warnings

import pytest
import torch

import utils.augmentations as aug
from utils.augmentations import (CITYSCAPES_MEAN_RGB, STRONG, VOC_MEAN_RGB, WEAK, JitterParams, adjust_brightness,
                                 adjust_contrast, adjust_hue, adjust_saturation, apply_jitter, color_jitter, flip,
                                 gaussian_blur, sample_jitter,
                                 mean_for_dataset, normalize, random_scale, strong_augment, weak_augment)
from utils.classmix import classmix
from utils.errors import UserError

IGNORE = 250


def _ramp(H, W, B=1):
    """value 10·row + col: bilinear interpolation reproduces it exactly; nearest shows which source pixel."""
    r = torch.arange(H).view(H, 1)
    c = torch.arange(W).view(1, W)
    return (10 * r + c).expand(B, H, W).clone()


def test_constants_in_one_place():
    assert (WEAK.scale_p, WEAK.scale_range, WEAK.flip_p, WEAK.jitter_p, WEAK.jitter_strength, WEAK.blur_p) == \
        (0.5, (0.75, 1.75), 0.5, 0.2, 0.125, 0.0)
    assert (STRONG.scale_p, STRONG.scale_range, STRONG.flip_p, STRONG.jitter_p, STRONG.jitter_strength,
            STRONG.blur_p) == (0.8, (0.75, 1.75), 0.5, 0.8, 0.25, 0.2)
    with pytest.raises(Exception):
        WEAK.flip_p = 1.0                                   # frozen


@pytest.mark.parametrize("W, left, right", [(8, 2, 2), (9, 2, 3)])
def test_random_scale_down_pads_centred_odd_right_and_top(W, left, right):
    # 5 x W, factor 0.5 -> 2 x (W // 2); dh = 3: top 2 (odd pixel), bottom 1; dw even or odd (odd pixel right)
    H = 5
    w = W // 2
    labels = _ramp(H, W, B=2)
    images = labels.float()[:, None].repeat(1, 3, 1, 1)
    conf = labels.float() / 100
    out_img, out_lab, out_conf = random_scale(images, labels, conf, 0.5, IGNORE)
    assert out_img.shape == (2, 3, H, W) and out_lab.shape == (2, H, W) and out_conf.shape == (2, H, W)
    assert out_lab.dtype == torch.long

    top, bottom = 2, 1
    inner = (slice(top, H - bottom), slice(left, W - right))
    valid = torch.zeros(H, W, dtype=torch.bool)
    valid[inner] = True
    assert bool((out_lab[:, ~valid] == IGNORE).all())
    assert bool((out_img[:, :, ~valid] == 0).all()) and bool((out_conf[:, ~valid] == 0).all())
    # nearest labels: source row floor(i·5/2) = 0, 2; source col floor(j·W/w) (non-square scale)
    src_r = torch.tensor([0, 2])
    src_c = torch.tensor([math.floor(j * W / w) for j in range(w)])
    assert torch.equal(out_lab[0][inner], 10 * src_r.view(2, 1) + src_c.view(1, w))
    assert src_c.tolist() == [0, 2, 4, 6]                      # 8/4 = 2; 9/4: 0, 2.25, 4.5, 6.75
    # bilinear align_corners=True of 10r + c: rows at 0 and 4, cols at j·(W−1)/(w−1)
    exp = 10 * torch.tensor([0.0, 4.0]).view(2, 1) + torch.tensor([j * (W - 1) / (w - 1) for j in range(w)])
    assert torch.allclose(out_img[1, 2][inner], exp, atol=1e-4)
    assert torch.allclose(out_conf[0][inner], exp / 100, atol=1e-6)


def test_random_scale_up_is_a_crop_of_the_upscaled_batch(monkeypatch):
    # 6 x 10, factor 1.5 -> 9 x 15; crop offsets from random.randint, as released the column offset x in [0, 5]
    # first, then the row offset y in [0, 3]
    calls = []
    offsets = iter([4, 2])

    def fake_randint(a, b):
        calls.append((a, b))
        return next(offsets)

    monkeypatch.setattr(aug.random, "randint", fake_randint)
    labels = _ramp(6, 10, B=2)
    images = torch.stack([labels.float(), labels.float() * 2, labels.float() + 1], dim=1)
    conf = labels.float() / 100
    out_img, out_lab, out_conf = random_scale(images, labels, conf, 1.5, IGNORE)
    assert calls == [(0, 5), (0, 3)]
    assert out_img.shape == (2, 3, 6, 10) and out_lab.shape == (2, 6, 10) and out_conf.shape == (2, 6, 10)
    # nearest, independent: source row floor(i·6/9), source col floor(j·10/15), on the crop rows 2..7, cols 4..13
    rows = torch.tensor([math.floor(i * 6 / 9) for i in range(2, 8)])
    cols = torch.tensor([math.floor(j * 10 / 15) for j in range(4, 14)])
    assert torch.equal(out_lab[1], 10 * rows.view(6, 1) + cols.view(1, 10))
    # bilinear align_corners=True: upscaled row i sits at i·5/8, col j at j·9/14
    exp = 10 * torch.tensor([i * 5 / 8 for i in range(2, 8)]).view(6, 1) + \
        torch.tensor([j * 9 / 14 for j in range(4, 14)]).view(1, 10)
    assert torch.allclose(out_img[0, 0], exp, atol=1e-4)
    assert torch.allclose(out_img[0, 1], 2 * exp, atol=1e-4)
    assert torch.allclose(out_conf[1], exp / 100, atol=1e-6)


def test_random_scale_factor_one_and_none_passthrough():
    images = torch.rand(2, 3, 5, 7) * 255
    labels = _ramp(5, 7, B=2)
    out = random_scale(images, labels, None, 1.0, IGNORE)
    assert torch.equal(out[0], images) and torch.equal(out[1], labels) and out[2] is None
    with pytest.raises(UserError, match="factor"):
        random_scale(images, labels, None, 0.0, IGNORE)


def test_flip():
    images = torch.arange(2 * 3 * 2 * 3, dtype=torch.float).view(2, 3, 2, 3)
    labels = torch.tensor([[[0, 1, 2], [3, 4, 5]]] * 2)
    conf = labels.float() / 10
    fi, fl, fc = flip(images, labels, conf)
    assert torch.equal(fl[0], torch.tensor([[2, 1, 0], [5, 4, 3]]))
    assert torch.equal(fc[1], torch.tensor([[2, 1, 0], [5, 4, 3]]) / 10)
    assert torch.equal(fi[1, 2, 0], images[1, 2, 0].flip(0))
    assert flip(images, None, None)[1] is None


def test_normalize_bgr_vs_rgb():
    images = torch.zeros(1, 3, 2, 3)
    images[:, 0] = 255.0
    rgb = normalize(images, VOC_MEAN_RGB, "RGB")
    bgr = normalize(images, VOC_MEAN_RGB, "BGR")
    r, g, b = VOC_MEAN_RGB
    assert torch.allclose(rgb[0, :, 1, 2], torch.tensor([(255 - r) / 255, -g / 255, -b / 255]))
    assert torch.allclose(bgr[0, :, 1, 2], torch.tensor([(255 - b) / 255, -g / 255, -r / 255]))
    with pytest.raises(UserError, match="channel_order"):
        normalize(images, VOC_MEAN_RGB, "bgr")


def test_mean_for_dataset():
    assert mean_for_dataset("pascal_voc") == (122.6789143, 116.66876762, 104.00698793) == VOC_MEAN_RGB
    assert mean_for_dataset("cityscapes") == (73.15835921, 82.90891754, 72.39239876) == CITYSCAPES_MEAN_RGB
    assert mean_for_dataset("synthetic") == (127.5, 127.5, 127.5)


def _gauss1d(sigma, size=23):
    k = torch.tensor([math.exp(-((i - size // 2) ** 2) / (2 * sigma ** 2)) for i in range(size)],
                     dtype=torch.float64)
    return k / k.sum()


def test_gaussian_blur_spreads_horizontally_not_vertically():
    H, W, r0, c0 = 31, 41, 15, 20                 # the bright pixel is > 11 from every border
    images = torch.zeros(2, 3, H, W)
    images[1, 2, r0, c0] = 1000.0
    out = gaussian_blur(images)
    assert out.shape == images.shape
    # independent kernel: σ = 0.1 along rows (vertical), σ = 1.5 along columns (horizontal)
    expected = torch.zeros(H, W, dtype=torch.float64)
    expected[r0 - 11:r0 + 12, c0 - 11:c0 + 12] = 1000 * torch.outer(_gauss1d(0.1), _gauss1d(1.5))
    assert torch.allclose(out[1, 2].double(), expected, atol=1e-3)
    assert abs(float(out[1, 2].sum()) - 1000.0) < 1e-2          # mass preserved away from borders
    assert float(out[1, 2, r0, c0 + 3] / out[1, 2, r0, c0]) == pytest.approx(math.exp(-2), rel=1e-3)
    assert float(out[1, 2, r0 + 1, c0]) < 1e-12 * 1000          # vertical: exp(-50)
    assert bool((out[0] == 0).all()) and bool((out[1, :2] == 0).all())


def test_color_jitter_range_shape_and_zero_strength():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 9, 13) * 255
    out = color_jitter(images, 0.25, "BGR")
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 255
    assert not torch.allclose(out, images)
    assert torch.equal(color_jitter(images, 0.0, "RGB"), images)


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 17, 23, generator=g) * 255
    labels = torch.randint(0, 5, (2, 17, 23), generator=g)
    labels[:, :2] = IGNORE
    conf = torch.rand(2, 17, 23, generator=g)
    return images, labels, conf


# --- colour jitter and blur against kornia 0.4.1, the version the release pins (requirements-test.txt) -------------

@pytest.fixture(scope="module")
def kornia():
    """kornia 0.4.1 as the oracle: the release called ColorJitter and GaussianBlur2d of exactly this version."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                 # torch.jit.script deprecation inside kornia 0.4.1
            import kornia as k
    except ImportError:                                     # an oracle that is missing must not turn into a skip
        pytest.fail("kornia 0.4.1 is the test oracle: pip install -r requirements-test.txt")
    assert k.__version__ == "0.4.1"
    return k


def _jitter_images():
    """[6,3,12,16] images in [0, 1] with the hard cases: grey, black, white, pure and saturated colours, ties of
    the maximum between channels, near-grey pixels, values at 0 and 1."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(6, 3, 12, 16, generator=g)
    x[0, :, :3] = 0.5                                                     # grey
    x[1, :, :, :2] = 0.0                                                  # black
    x[1, :, :, 2:4] = 1.0                                                 # white
    x[2, :, :3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)             # pure red (hue wraps around 0)
    x[2, :, 3:6] = torch.tensor([0.9, 0.9, 0.2]).view(3, 1, 1)            # R = G maximum
    x[2, :, 6:9] = torch.tensor([0.6, 0.1, 0.6]).view(3, 1, 1)            # R = B maximum
    x[2, :, 9:] = torch.tensor([0.3, 0.8, 0.8]).view(3, 1, 1)             # G = B maximum
    x[3, :, :4] = 0.4 + 1e-4 * torch.rand(3, 4, 16, generator=g)          # near grey
    x[4] = x[4] * 0.05                                                    # dark
    return x


# per-image factors spanning the ranges, with extremes: saturation 2 clips S at 1, hue ±0.5 reverses the colour
_OP_FACTORS = {
    "brightness": torch.tensor([0.75, 1.25, 0.0, 2.0, 1.0, 0.9]),
    "contrast": torch.tensor([0.75, 1.25, 0.0, 2.0, 1.0, 1.1]),
    "saturation": torch.tensor([0.875, 1.125, 0.0, 2.0, 1.0, 1.5]),
    "hue": torch.tensor([-1 / 12, 1 / 12, 0.5, -0.5, 0.0, 0.03]),
}
_OURS = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
         "hue": adjust_hue}


@pytest.mark.parametrize("op", list(_OP_FACTORS))
def test_each_jitter_operation_matches_kornia(kornia, op):
    from kornia.augmentation import functional as KF
    x = _jitter_images()
    factors = _OP_FACTORS[op]
    expected = getattr(KF, f"apply_adjust_{op}")(x, {f"{op}_factor": factors})
    out = _OURS[op](x, factors)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.allclose(out, expected, rtol=0, atol=1e-5)
    assert float(out.min()) >= 0 and float(out.max()) <= 1                # as kornia's: no rounding outside


def test_jitter_operations_hand_worked():
    def px(*rgb):
        return torch.tensor(rgb).view(1, 3, 1, 1)

    def one(v):
        return torch.tensor([v])

    def close(a, b):
        return torch.allclose(a, b, rtol=0, atol=1e-6)
    # brightness adds b − 1 and clips (not a multiplication)
    assert close(adjust_brightness(px(0.5, 0.1, 0.95), one(1.2)), px(0.7, 0.3, 1.0))
    assert close(adjust_brightness(px(0.5, 0.1, 0.95), one(0.8)), px(0.3, 0.0, 0.75))
    # contrast multiplies about 0 and clips (not a blend with the mean)
    assert close(adjust_contrast(px(0.6, 0.2, 0.8), one(1.5)), px(0.9, 0.3, 1.0))
    assert close(adjust_contrast(px(0.6, 0.2, 0.8), one(0.5)), px(0.3, 0.1, 0.4))
    # saturation: (0.8, 0.4, 0.2) has V = 0.8, S = 0.75; S·1.5 clips at 1 (min -> 0); S·0.5 = 0.375
    assert close(adjust_saturation(px(0.8, 0.4, 0.2), one(1.5)), px(0.8, 0.8 - 0.4 * 4 / 3, 0.0))
    assert close(adjust_saturation(px(0.8, 0.4, 0.2), one(0.5)), px(0.8, 0.6, 0.5))
    assert close(adjust_saturation(px(0.0, 0.0, 0.0), one(1.5)), px(0.0, 0.0, 0.0))       # V = 0: S = 0
    # hue: (0.8, 0.4, 0.2) has H = 1/18; + 1/12 -> 5/36: (V, V(1 − S/6), V(1 − S)) = (0.8, 0.7, 0.2)
    assert close(adjust_hue(px(0.8, 0.4, 0.2), one(1 / 12)), px(0.8, 0.7, 0.2))
    assert close(adjust_hue(px(1.0, 0.0, 0.0), one(1 / 3)), px(0.0, 1.0, 0.0))           # red -> green
    assert close(adjust_hue(px(1.0, 0.0, 0.0), one(-1 / 12)), px(1.0, 0.0, 0.5))         # wraps: H = 11/12
    # the order of the operations matters: brightness then contrast vs contrast then brightness
    p = JitterParams(one(1.2), one(1.5), one(1.0), one(0.0), (0, 1, 2, 3))
    assert close(apply_jitter(px(0.5, 0.5, 0.5), p), px(1.0, 1.0, 1.0))                   # (0.5 + 0.2)·1.5
    p = JitterParams(one(1.2), one(1.5), one(1.0), one(0.0), (1, 0, 2, 3))
    assert close(apply_jitter(px(0.5, 0.5, 0.5), p), px(0.95, 0.95, 0.95))                # 0.5·1.5 + 0.2


@pytest.mark.parametrize("s", [0.125, 0.25])
def test_sampled_factors_equal_kornias_under_the_same_seed(kornia, s):
    # the release: ColorJitter(brightness=s, contrast=s, saturation=s/2, hue=s/3) on the whole batch (p = 1)
    x = _jitter_images()
    jitter = kornia.augmentation.ColorJitter(brightness=s, contrast=s, saturation=s / 2.0, hue=s / 3.0)
    for seed in range(4):
        torch.manual_seed(seed)
        jitter(x)
        ref, after_ref = jitter._params, torch.rand(3)
        torch.manual_seed(seed)
        ours, after_ours = sample_jitter(x.shape[0], s), torch.rand(3)
        assert bool(ref["batch_prob"].all())                                  # every image is jittered
        for name in ("brightness", "contrast", "saturation", "hue"):
            assert torch.equal(getattr(ours, name), ref[f"{name}_factor"]), name
        assert ours.order == tuple(ref["order"].tolist())
        assert torch.equal(after_ours, after_ref)                            # the same number of draws


@pytest.mark.parametrize("s", [0.125, 0.25])
def test_sampled_factor_ranges(s):
    torch.manual_seed(0)
    n = 4000
    p = sample_jitter(n, s)
    for f, lo, hi in ((p.brightness, 1 - s, 1 + s), (p.contrast, 1 - s, 1 + s),
                      (p.saturation, 1 - s / 2, 1 + s / 2), (p.hue, -s / 3, s / 3)):
        assert f.shape == (n,) and f.dtype == torch.float32
        width = hi - lo
        assert float(f.min()) >= lo - 1e-7 and float(f.max()) <= hi + 1e-7
        assert float(f.min()) < lo + 0.01 * width and float(f.max()) > hi - 0.01 * width
        # uniform: each quarter of the range holds a quarter of the draws (binomial sd ≈ 27)
        counts = torch.histc(f, bins=4, min=lo, max=hi)
        assert bool(((counts - n / 4).abs() < 150).all()), counts
    assert sorted(p.order) == [0, 1, 2, 3]


def test_color_jitter_matches_kornia_colorjitter_on_0_255_images(kornia):
    # the release: ColorJitter(s, s, s/2, s/3)(images / 255) * 255 on the batch as it is, BGR included
    images = _jitter_images() * 255
    orders = set()
    for s in (0.125, 0.25):
        jitter = kornia.augmentation.ColorJitter(brightness=s, contrast=s, saturation=s / 2.0, hue=s / 3.0)
        for seed in range(6):
            torch.manual_seed(seed)
            expected = jitter(images / 255.0) * 255.0
            orders.add(tuple(jitter._params["order"].tolist()))
            for channel_order in ("BGR", "RGB"):
                torch.manual_seed(seed)
                out = color_jitter(images, s, channel_order)
                assert torch.allclose(out, expected, rtol=0, atol=2e-3), (s, seed, channel_order)
    assert len(orders) >= 4                                  # several orders of the operations were exercised


def test_bgr_batch_gets_the_opposite_hue_shift():
    # what feeding BGR to an RGB hue rotation means: the true hue moves by −δ (same distribution, δ symmetric)
    x = _jitter_images()
    shift = torch.tensor([0.05, -0.08, 0.02, 0.1, -0.03, 0.07])
    assert torch.allclose(adjust_hue(x.flip(1), shift).flip(1), adjust_hue(x, -shift), rtol=0, atol=1e-5)
    assert not torch.allclose(adjust_hue(x.flip(1), shift).flip(1), adjust_hue(x, shift), atol=1e-2)


def test_gaussian_blur_matches_kornia(kornia):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 19, 37, generator=g) * 255                 # non-square, borders reflected on all sides
    expected = kornia.filters.GaussianBlur2d(kernel_size=(23, 23), sigma=(0.1, 1.5))(images)
    assert torch.allclose(gaussian_blur(images), expected, rtol=0, atol=1e-3)
    with pytest.raises(UserError, match="too small"):
        gaussian_blur(torch.zeros(1, 3, 11, 40))


def test_jitter_gate_jitters_the_whole_batch(monkeypatch):
    images, labels, conf = _batch()
    # strong: flip no, jitter yes, blur no, (grayscale, solarize), scale no -> exactly color_jitter(images, 0.25)
    # under the same torch seed
    draws = iter([0.9, 0.1, 0.9, 0.5, 0.5, 0.9])
    monkeypatch.setattr(aug.random, "random", lambda: next(draws))
    torch.manual_seed(11)
    oi, ol, oc = strong_augment(images, labels, conf, ignore_label=IGNORE, channel_order="BGR")
    torch.manual_seed(11)
    assert torch.equal(oi, color_jitter(images, 0.25, "BGR"))
    assert torch.equal(ol, labels) and torch.equal(oc, conf)
    assert bool(((oi - images).abs().amax(dim=(1, 2, 3)) > 1).all())     # every image changed


def test_training_code_does_not_import_kornia():
    root = pathlib.Path(__file__).resolve().parent.parent
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and d not in ("tests", "runs")]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = pathlib.Path(folder, name)
            text = path.read_text()
            if "kornia" not in text:
                continue
            for node in ast.walk(ast.parse(text, filename=str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n.split(".")[0] == "kornia" for n in names), f"{path} imports kornia"


@pytest.mark.parametrize("fn", [weak_augment, strong_augment])
@pytest.mark.parametrize("order", ["BGR", "RGB"])
def test_weak_strong_all_steps_keep_shapes_and_dtypes(monkeypatch, fn, order):
    images, labels, conf = _batch()
    monkeypatch.setattr(aug.random, "random", lambda: 0.0)        # every step taken
    for seed in range(4):
        random.seed(seed)
        masks = torch.rand(2, 17, 23) < 0.5 if seed % 2 else None
        oi, ol, oc = fn(images, labels, conf, ignore_label=IGNORE, channel_order=order, classmix_masks=masks)
        assert oi.shape == images.shape and oi.dtype == images.dtype
        assert ol.shape == labels.shape and ol.dtype == labels.dtype
        assert oc.shape == conf.shape and oc.dtype == conf.dtype
        assert set(ol.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE}
        assert float(oc.min()) >= 0 and float(oc.max()) <= 1
        assert float(oi.min()) >= 0 and float(oi.max()) <= 255 + 1e-3


@pytest.mark.parametrize("fn, draws", [(weak_augment, 6), (strong_augment, 6)])
def test_no_step_taken_returns_inputs(monkeypatch, fn, draws):
    images, labels, conf = _batch()
    calls = []
    monkeypatch.setattr(aug.random, "random", lambda: calls.append(1) or 0.99)
    oi, ol, oc = fn(images, labels, conf, ignore_label=IGNORE, channel_order="BGR")
    assert torch.equal(oi, images) and torch.equal(ol, labels) and torch.equal(oc, conf)
    assert len(calls) == draws            # flip, jitter, blur, grayscale, solarize, scale gate (as released)
    # with masks, only ClassMix is applied
    masks = torch.zeros(2, 17, 23, dtype=torch.bool)
    masks[1, 3:9, 4:20] = True
    oi, ol, oc = fn(images, labels, None, ignore_label=IGNORE, channel_order="RGB", classmix_masks=masks)
    ei, el, _ = classmix(masks, images, labels)
    assert torch.equal(oi, ei) and torch.equal(ol, el) and oc is None
    assert torch.equal(ol[0, 3:9, 4:20], labels[1, 3:9, 4:20])


def test_decisions_thresholds_and_order(monkeypatch):
    images, labels, conf = _batch()
    # strong, in the release's order: flip yes (0.1 < 0.5), jitter no (0.9 >= 0.8), blur yes (0.1 < 0.2),
    # grayscale and solarize (unused), scale no (0.85 >= 0.8)
    draws = iter([0.1, 0.9, 0.1, 0.0, 0.0, 0.85])
    monkeypatch.setattr(aug.random, "random", lambda: next(draws))
    oi, ol, oc = strong_augment(images, labels, conf, ignore_label=IGNORE, channel_order="BGR")
    assert torch.equal(ol, labels.flip(-1)) and torch.equal(oc, conf.flip(-1))
    assert torch.allclose(oi, gaussian_blur(images.flip(-1)))
    # weak: flip no (0.5), jitter no (0.2 is not < 0.2), blur never (0.0 is not < 0), grayscale, solarize,
    # scale yes (0.4 < 0.5) with factor 1.5 (crop at 0, 0)
    draws = iter([0.5, 0.2, 0.0, 0.0, 0.0, 0.4])
    monkeypatch.setattr(aug.random, "random", lambda: next(draws))
    monkeypatch.setattr(aug.random, "uniform", lambda a, b: 1.5 if (a, b) == (0.75, 1.75) else None)
    monkeypatch.setattr(aug.random, "randint", lambda a, b: 0)
    oi, ol, oc = weak_augment(images, labels, conf, ignore_label=IGNORE, channel_order="BGR")
    ei, el, ec = random_scale(images, labels, conf, 1.5, IGNORE)
    assert torch.equal(oi, ei) and torch.equal(ol, el) and torch.equal(oc, ec)
    assert not torch.equal(ol, labels)


class _RecordingRandom:
    """Stands in for Python's `random` module: logs every call, answers from a script."""

    def __init__(self, randoms, factor=1.5, offsets=(0, 0)):
        self.log, self._randoms, self._factor, self._offsets = [], iter(randoms), factor, iter(offsets)

    def random(self):
        self.log.append("random")
        return next(self._randoms)

    def uniform(self, a, b):
        self.log.append(("uniform", a, b))
        return self._factor

    def randint(self, a, b):
        self.log.append(("randint", a, b))
        return next(self._offsets)


@pytest.mark.parametrize("fn", [weak_augment, strong_augment])
def test_python_random_draws_in_the_release_order(monkeypatch, fn):
    # the release's augment_samples: flip, jitter, blur, grayscale, solarize, scale gate, factor, then inside the
    # scale step the column offset and the row offset of the crop. 17 x 23 at 1.5 -> 25 x 34: x in [0, 11],
    # y in [0, 8]. Draws of 0.99 leave flip, jitter and blur off; the scale gate fires with 0.0.
    images, labels, conf = _batch()
    rec = _RecordingRandom([0.99, 0.99, 0.99, 0.99, 0.99, 0.0], factor=1.5, offsets=(11, 8))
    monkeypatch.setattr(aug, "random", rec)
    oi, ol, oc = fn(images, labels, conf, ignore_label=IGNORE, channel_order="BGR")
    assert rec.log == ["random"] * 6 + [("uniform", 0.75, 1.75), ("randint", 0, 11), ("randint", 0, 8)]
    # the crop takes rows 8..24 and columns 11..33 of the enlarged batch
    big = torch.nn.functional.interpolate(images, size=(25, 34), mode="bilinear", align_corners=True)
    assert torch.equal(oi, big[..., 8:25, 11:34])
    # 1 < f < 1 + 1/H keeps the size; the two offsets (both 0) are still drawn
    rec = _RecordingRandom([], offsets=(0, 0))
    monkeypatch.setattr(aug, "random", rec)
    out = random_scale(images, labels, conf, 1.01, IGNORE)
    assert rec.log == [("randint", 0, 0), ("randint", 0, 0)] and torch.equal(out[0], images)
