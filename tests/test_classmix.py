"""ClassMix masks and cyclic mixing (SPEC 5.1), with hand-worked expectations."""
import pytest
import torch

from utils.classmix import classmix, classmix_masks
from utils.errors import UserError

IGNORE = 250


def _label_map(values, shape=(4, 6)):
    """A non-square [H,W] label map in which every value of `values` occupies at least one pixel."""
    H, W = shape
    assert H * W >= len(values)
    order = torch.randperm(H * W, generator=torch.Generator().manual_seed(H * W))   # fixed scramble
    v = torch.tensor(values, dtype=torch.long)
    return v[order % len(values)].reshape(H, W)


def _picked(mask, labels):
    """Set of label values in the mask; asserts every value is either fully in or fully out."""
    picked = set()
    for v in labels.unique().tolist():
        inside = mask[labels == v]
        assert bool(inside.all()) or not bool(inside.any()), f"class {v} only partly in the mask"
        if bool(inside.all()):
            picked.add(v)
    return picked


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_picks_floor_half_plus_one_whole_classes(n):
    values = [3, 7, 1, 12, 5][:n]
    lab = _label_map(values)
    labels = lab.expand(64, *lab.shape).contiguous()        # 64 independent draws at once
    masks = classmix_masks(labels, IGNORE, drop_background=False, generator=torch.Generator().manual_seed(n))
    assert masks.shape == labels.shape and masks.dtype == torch.bool
    expected = [1, 2, 2, 3, 3][n - 1]                       # floor(n/2) + 1
    seen = set()
    for k in range(labels.shape[0]):
        picked = _picked(masks[k], labels[k])
        assert len(picked) == expected and picked <= set(values)
        seen.add(frozenset(picked))
    if n >= 3:
        assert len(seen) > 1                                 # random, not always the same subset


def test_each_class_picked_uniformly():
    # n = 4 -> 3 of 4 picked: each class in the mask with probability 3/4
    lab = _label_map([0, 2, 4, 6])
    labels = lab.expand(4000, *lab.shape).contiguous()
    masks = classmix_masks(labels, IGNORE, drop_background=False, generator=torch.Generator().manual_seed(0))
    for v in (0, 2, 4, 6):
        first_pixel = (lab == v).flatten().nonzero()[0, 0]
        freq = masks.flatten(1)[:, first_pixel].float().mean()
        assert abs(float(freq) - 0.75) < 0.03


def test_ignore_dropped_only_when_another_class_remains():
    H, W = 3, 5
    ign_and_one = torch.full((H, W), IGNORE)
    ign_and_one[1, 1:4] = 4
    ign_only = torch.full((H, W), IGNORE)
    ign_and_three = _label_map([IGNORE, 2, 9, 11], (H, W))
    labels = torch.stack([ign_and_one, ign_only, ign_and_three])
    for seed in range(10):
        masks = classmix_masks(labels, IGNORE, drop_background=False, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(masks[0], ign_and_one == 4)       # the one class, never the ignore pixels
        assert bool(masks[1].all())                          # ignore alone: n = 1, its pixels are the mask
        picked = _picked(masks[2], ign_and_three)
        assert IGNORE not in picked and len(picked) == 2     # n = 3 -> 2


def test_voc_background_dropped_only_when_more_than_one_class_remains():
    VOC_IGNORE = 255
    a = _label_map([0, 5])                  # background dropped -> only 5
    b = _label_map([0])                     # background alone -> kept
    c = _label_map([0, VOC_IGNORE])         # ignore dropped first, then background is the only class -> kept
    d = _label_map([0, VOC_IGNORE, 4, 7])   # both dropped, n = 2 -> both 4 and 7
    labels = torch.stack([a, b, c, d])
    for seed in range(5):
        m = classmix_masks(labels, VOC_IGNORE, drop_background=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(m[0], a == 5)
        assert bool(m[1].all())
        assert torch.equal(m[2], c == 0)
        assert torch.equal(m[3], (d == 4) | (d == 7))
    # without drop_background, {0, 5} has n = 2 -> both picked -> everything
    m = classmix_masks(a[None], VOC_IGNORE, drop_background=False)
    assert bool(m.all())


def test_generator_reproducible_and_global_rng_used_otherwise():
    labels = torch.stack([_label_map([1, 2, 3, 4, 5, 6, 7]) for _ in range(8)])
    m1 = classmix_masks(labels, IGNORE, False, generator=torch.Generator().manual_seed(3))
    m2 = classmix_masks(labels, IGNORE, False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2)
    torch.manual_seed(11)
    g1 = classmix_masks(labels, IGNORE, False)
    torch.manual_seed(11)
    g2 = classmix_masks(labels, IGNORE, False)
    assert torch.equal(g1, g2)


def test_ignore_label_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="num_values"):
        classmix_masks(torch.zeros(1, 2, 2, dtype=torch.long), 300, False)


def test_classmix_cyclic_exact_b3():
    labels = torch.tensor([[[1, 1], [2, 2]],
                           [[3, 4], [3, 4]],
                           [[5, 6], [7, 8]]])
    masks = torch.tensor([[[True, False], [False, False]],
                          [[False, True], [False, True]],
                          [[True, True], [False, False]]])
    conf = torch.tensor([[[0.1, 0.2], [0.3, 0.4]],
                         [[0.5, 0.6], [0.7, 0.8]],
                         [[0.9, 1.0], [0.0, 0.5]]])
    images = torch.stack([labels.float() * 10 + c for c in range(3)], dim=1)   # [3,3,2,2], channel c adds c

    out_img, out_lab, out_conf = classmix(masks, images, labels, conf)
    # out 0 = image 0 with image 1 where M_1 (right column); out 1 = image 1 with image 2 where M_2 (top row);
    # out 2 = image 2 with image 0 where M_0 (top-left pixel)
    exp_lab = torch.tensor([[[1, 4], [2, 4]],
                            [[5, 6], [3, 4]],
                            [[1, 6], [7, 8]]])
    exp_conf = torch.tensor([[[0.1, 0.6], [0.3, 0.8]],
                             [[0.9, 1.0], [0.7, 0.8]],
                             [[0.1, 1.0], [0.0, 0.5]]])
    assert torch.equal(out_lab, exp_lab) and out_lab.dtype == torch.long
    assert torch.equal(out_conf, exp_conf)
    assert torch.equal(out_img, torch.stack([exp_lab.float() * 10 + c for c in range(3)], dim=1))


def test_classmix_passes_none_and_checks_shapes():
    images = torch.rand(2, 3, 4, 5)
    masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    img, lab, conf = classmix(masks, images)
    assert torch.equal(img, images) and lab is None and conf is None
    with pytest.raises(UserError, match="masks"):
        classmix(torch.zeros(2, 5, 4, dtype=torch.bool), images)


def test_masks_from_labels_then_mix_end_to_end():
    # label maps of disjoint value sets: mixed output k takes exactly image k+1's picked classes
    a = _label_map([1, 2, 3])
    b = _label_map([4, 5, 6])
    labels = torch.stack([a, b])
    masks = classmix_masks(labels, IGNORE, False, generator=torch.Generator().manual_seed(0))
    _, mixed, _ = classmix(masks, labels.float()[:, None].expand(2, 3, 4, 6), labels)
    assert set(mixed[0].unique().tolist()) - {1, 2, 3} == _picked(masks[1], b)
    assert set(mixed[1].unique().tolist()) - {4, 5, 6} == _picked(masks[0], a)
