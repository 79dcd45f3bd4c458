"""The steps of one iteration (utils/ssl_steps.py) one by one, on stand-in contexts with values worked out by hand:
what each step hands to the building blocks it calls and what it returns. The same steps inside a real run:
tests/test_run_wiring.py."""
from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from utils import ssl_steps


def test_upsample_is_bilinear_with_corners_aligned_and_resize_nearest_keeps_the_dtype():
    """Worked by hand: [0, 1] upsampled to 5 columns with align_corners=True is [0, .25, .5, .75, 1] (False would
    give [0, .1, .5, .9, 1]), in float32 from float64 logits; labels resized by nearest neighbour keep their dtype."""
    out = ssl_steps.upsample(torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64), (1, 5))
    assert out.dtype == torch.float32 and out.flatten().tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    labels = torch.tensor([[[3, 250], [0, 7]]])                                    # [1, 2, 2] int64
    resized = ssl_steps.resize_nearest(labels, (4, 4))
    assert resized.dtype == torch.int64
    assert resized.tolist() == [[[3, 3, 250, 250], [3, 3, 250, 250], [0, 0, 7, 7], [0, 0, 7, 7]]]


def test_pseudo_label_is_the_softmax_over_classes_of_the_labeler():
    """One pixel, logits (0, ln 3) from the labeler (the teacher here, not the student): softmax over the classes
    gives (1/4, 3/4), so confidence 3/4 and label 1 (a softmax over any other dimension gives 1 and label 0)."""

    class FixedLogits(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)

    run = SimpleNamespace(labeler=FixedLogits(), student_module=None, autocast=nullcontext, crop=(1, 1),
                          mean_rgb=(0.0, 0.0, 0.0), channel_order="RGB")
    confidence, labels = ssl_steps.pseudo_label(run, torch.zeros(1, 3, 1, 1))
    assert labels.tolist() == [[[1]]] and confidence.item() == pytest.approx(0.75, abs=1e-6)


def test_augmentation_steps_pass_classmix_masks_and_the_run_settings(monkeypatch):
    """Steps 4 and 5 on a stand-in run, ClassMix probability 1, the augmentations and the mask drawing replaced by
    recorders: the masks drawn from the (pseudo-)labels with the run's ignore label and drop_background reach the
    augmentation with the run's ignore label and channel order; two strong views, each with its own masks, and
    none drawn when the unlabeled step does not mix (`mix` false)."""
    drawn, weak, strong = [], [], []

    def draw(labels, ignore_label, drop_background):
        drawn.append((labels, ignore_label, drop_background))
        return f"masks{len(drawn)}"

    def recorder(calls):
        def augment(images, labels, confidences=None, **kw):
            calls.append((labels, confidences, kw))
            return images, labels, confidences
        return augment

    monkeypatch.setattr(ssl_steps, "classmix_masks", draw)
    monkeypatch.setattr(ssl_steps, "weak_augment", recorder(weak))
    monkeypatch.setattr(ssl_steps, "strong_augment", recorder(strong))
    run = SimpleNamespace(method={"labeled_classmix_prob": 1.0, "unlabeled_classmix_prob": 1.0}, ignore_label=7,
                          drop_background="drop?", channel_order="BGR")
    images, labels, pseudo, conf = torch.zeros(1, 3, 2, 2), "labels", torch.ones(1, 2, 2), torch.ones(1, 2, 2)
    ssl_steps.augment_labeled(run, images, labels)
    assert drawn == [("labels", 7, "drop?")]
    assert weak == [("labels", None, {"ignore_label": 7, "channel_order": "BGR", "classmix_masks": "masks1"})]
    mixed, mixed_pseudo, mixed_conf = ssl_steps.augment_unlabeled(run, images, pseudo, conf, mix=True)
    assert [d[1:] for d in drawn[1:]] == [(7, "drop?")] * 2 and all(d[0] is pseudo for d in drawn[1:])
    assert [c[2] for c in strong] == [{"ignore_label": 7, "channel_order": "BGR", "classmix_masks": f"masks{k}"}
                                      for k in (2, 3)]
    assert all(c[0] is pseudo and c[1] is conf for c in strong)
    # the two views concatenated (the loop hands them to the run for TensorBoard pictures: test below)
    assert torch.equal(mixed, torch.cat([images, images])) and torch.equal(mixed_pseudo, torch.cat([pseudo, pseudo]))
    assert torch.equal(mixed_conf, torch.cat([conf, conf]))
    strong.clear()
    ssl_steps.augment_unlabeled(run, images, pseudo, conf, mix=False)
    assert len(drawn) == 3 and [c[2]["classmix_masks"] for c in strong] == [None, None]


@pytest.mark.parametrize("broadcast", [False, True])
def test_unlabeled_losses_worked_by_hand(broadcast):
    """Step 8's unlabeled terms on 2 images of 1x2 pixels, 2 classes, ignore label 9, at i = R/2 (ramp exp(-1.25)),
    power 2, entropy weight 0.5, class weights (1, 2). Logits (0, ln 3) give q = (1/4, 3/4): CE of class 1 is
    ln(4/3), entropy H = 2 - (3/4) log2 3; logits (0, 0) give CE ln 2 and H = 1.
      image 0: pixel (0, ln 3) pseudo 1, p = 0.5  | pixel (ln 3, ln 3) ignored (q = (1/2, 1/2): H = 1)
      image 1: pixel (ln 3, 0) pseudo 0, p = 1    | pixel (0, 0) pseudo 0, p = 0.5
    Pseudo-label CE = ramp/4 (2 ln(4/3) 0.5^2 + ln(4/3) + ln 2 0.5^2) (ignored pixels count in the mean as 0).
    Entropy per image: mean over the 3 valid pixels (2H + 1)/3. With the released [n,1,h,w] mask (less-memory and
    domain-adaptation scripts) the numerator is sum over pixels of (valid count) x (sum of H over images): pixel 0
    gives 2 (H + H), pixel 1 gives 1 (1 + 1); over n h w mean(mask) = 3: (4H + 2)/3."""
    run = SimpleNamespace(method={"ramp_up_iterations": 10, "pseudo_label_power": 2, "entropy_weight": 0.5},
                          ignore_label=9)
    ln3 = math.log(3.0)
    logits = torch.tensor([[[[0.0, ln3]], [[ln3, ln3]]],
                           [[[ln3, 0.0]], [[0.0, 0.0]]]])                   # [n=2, C=2, 1, 2]
    pseudo = torch.tensor([[[1, 9]], [[0, 0]]])
    confidence = torch.tensor([[[0.5, 0.8]], [[1.0, 0.5]]])
    loss_pseudo, loss_entropy = ssl_steps.unlabeled_losses(run, 5, logits, pseudo, confidence,
                                                           torch.tensor([1.0, 2.0]), broadcast)
    ramp = math.exp(-1.25)
    ce = ramp / 4 * (2 * math.log(4 / 3) * 0.25 + math.log(4 / 3) + math.log(2.0) * 0.25)
    H = 2 - 0.75 * math.log2(3.0)
    entropy = (4 * H + 2) / 3 if broadcast else (2 * H + 1) / 3
    assert loss_pseudo.item() == pytest.approx(ce, rel=1e-6)
    assert loss_entropy.item() == pytest.approx(0.5 * entropy, rel=1e-6)


def test_contrastive_term_needs_two_labelled_vectors(monkeypatch):
    """Fewer than two pixels with a valid label: an exact zero that keeps a (zero) gradient path, and no heads or
    loss called (their BatchNorm needs two vectors); two: the loss gets those two feature vectors [2, F] and their
    labels (heads and loss stand-ins here: the loss returns the vectors' sum)."""
    calls = []
    monkeypatch.setattr(ssl_steps, "contrastive_loss",
                        lambda v, y, *a, **k: (calls.append((tuple(v.shape), y.tolist())), v.sum())[1])
    model = SimpleNamespace(projection_head=lambda v: v, prediction_head=lambda v: v,
                            feature_selectors=lambda: [], memory_selectors=lambda: [])
    run = SimpleNamespace(student_module=model, ignore_label=250, autocast=nullcontext, memory=None, num_classes=3,
                          fidelity=SimpleNamespace(memory_weights="ones"))
    labels = torch.full((1, 2, 2), 250)
    labels[0, 0, 0] = 1
    features = torch.arange(1.0, 13.0).reshape(1, 3, 2, 2).requires_grad_(True)  # [B=1, F=3, 2, 2]
    out = ssl_steps.contrastive_term(run, features, labels)
    out.backward()
    assert out.item() == 0.0 and calls == [] and torch.equal(features.grad, torch.zeros_like(features))
    labels[0, 1, 1] = 2
    out = ssl_steps.contrastive_term(run, features, labels)
    assert calls == [((2, 3), [1, 2])] and out.item() == (1 + 5 + 9) + (4 + 8 + 12)


def test_memory_update_needs_two_admitted_vectors():
    """Step 9 on a stand-in run (a labeler with planted logits and features at crop size, memory of 2 classes x
    3 slots x 4 dims, features of 5 dims): one pixel both confident (p = 0.9 > 0.8) and correct gives no
    projection (the heads' BatchNorm needs two vectors) but still an empty [0, 4] float32 block and [0] labels
    through gather_rows to the memory (under torchrun the other processes' rows join it, so its width must be the
    memory's); two such pixels go through the projection head ([2, 5] in) and reach the memory in float32, with
    the teacher's selectors, the quota and the preset's keep rule."""
    ln3, ln9 = math.log(3.0), math.log(9.0)

    class Labeler(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits
            self.projection_head = lambda v: (heads.append(v.clone()), 2 * v[:, :4].double())[1]

        def forward(self, x, return_features=False):
            assert return_features
            return self.logits, torch.arange(15.0).view(1, 5, 1, 3)           # features [1, F=5, 1, 3]

    heads, gathered, added = [], [], []
    run = SimpleNamespace(autocast=nullcontext, student_module=None, crop=(1, 3),
                          mean_rgb=(0.0, 0.0, 0.0), channel_order="RGB",
                          method={"memory_confidence": 0.8}, memory_quota=7,
                          gather_rows=lambda p, y: (gathered.append((p, y)), (p, y))[1],
                          memory=SimpleNamespace(memory=torch.zeros(2, 3, 4),
                                                 add=lambda p, y, sel, **kw: added.append((p, y, sel, kw))),
                          teacher=SimpleNamespace(feature_selectors=lambda: "teacher selectors"),
                          fidelity=SimpleNamespace(memory_keep="lowest?"))
    labels = torch.tensor([[[1, 0, 0]]])
    # logits (0, ln 9) at pixels 0 and 1: class 1 at p = 9/10 (pixel 0 correct, pixel 1 labelled 0: wrong);
    # (ln 3, 0) at pixel 2: class 0 at p = 3/4, correct but not above the threshold 0.8
    run.labeler = Labeler(torch.tensor([[[[0.0, 0.0, ln3]], [[ln9, ln9, 0.0]]]]))
    ssl_steps.update_memory(run, torch.zeros(1, 3, 1, 3), labels)
    assert heads == []
    ((p, y),) = gathered
    assert p.shape == (0, 4) and p.dtype == torch.float32 and y.shape == (0,) and y.dtype == torch.int64
    ((p2, y2, selectors, kw),) = added
    assert p2 is p and y2 is y and selectors == "teacher selectors" and kw == {"quota": 7, "keep": "lowest?"}
    gathered.clear()
    added.clear()
    labels[0, 0, 1] = 1  # pixel 1 is now correct too
    ssl_steps.update_memory(run, torch.zeros(1, 3, 1, 3), labels)
    (vectors,) = heads
    assert vectors.tolist() == [[0.0, 3.0, 6.0, 9.0, 12.0], [1.0, 4.0, 7.0, 10.0, 13.0]]  # pixels 0 and 1
    ((p, y),) = gathered
    assert p.dtype == torch.float32 and p.tolist() == [[0.0, 6.0, 12.0, 18.0], [2.0, 8.0, 14.0, 20.0]]
    assert y.tolist() == [1, 1] and added[0][0] is p
