"""evaluateSSL.py: saved predictions and overlays, the per-class summary worst first, and the sliding-window
protocol next to the paper's whole-image one (engine/evaluation.py predict_sliding)."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluateSSL
from data.synthetic import CLASS_NAMES, PALETTE, SyntheticStreets, export_folder
from model import build_model
from engine.config import load_config
from engine.evaluation import predict_logits, predict_sliding
from tests.test_resume import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

SIZE = (40, 60)


class Pointwise(torch.nn.Module):
    """A 1x1 convolution: its logits at a pixel depend on that pixel only, so every window agrees with the whole
    image and the sliding sum is (number of windows covering the pixel) x softmax."""

    def __init__(self, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_windows_sum_softmax_over_overlaps():
    model = Pointwise()
    x = torch.randn(2, 3, 10, 14)
    with torch.no_grad():
        got = predict_sliding(model, x, (10, 14), window=(6, 8), overlap=1 / 3)
        probs = torch.softmax(model(x), dim=1)
    # by hand: rows stride int(6·2/3) = 4 -> windows at 0, 4 (= 10 - 6); columns stride int(8·2/3) = 5 -> 0, 5 and
    # the last full window at 14 - 8 = 6
    coverage = torch.zeros(10, 14)
    for y in (0, 4):
        for x0 in (0, 5, 6):
            coverage[y:y + 6, x0:x0 + 8] += 1
    assert coverage.min() == 1 and coverage.max() == 6
    torch.testing.assert_close(got, probs * coverage, rtol=1e-5, atol=1e-6)


def test_one_window_covering_the_image_is_the_whole_image_protocol():
    model = build_model("2", 8, "imagenet", 18, None, verbose=False).eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        whole = predict_logits(model, x, SIZE)
        sliding = predict_sliding(model, x, SIZE, window=(64, 64))  # larger than the image: one window
    torch.testing.assert_close(sliding, torch.softmax(whole, dim=1), rtol=1e-5, atol=1e-6)
    assert sliding.argmax(1).equal(whole.argmax(1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random ResNet-18 DeepLabv2 with the config of a folder dataset of 3 synthetic validation scenes."""
    root = str(tmp_path_factory.mktemp("data"))
    config = export_folder(root, num_train=4, num_val=3, image_size=SIZE)
    # the exported config is the demo's (backbone.width 32); these checkpoints hold a standard-width network
    cfg = load_config(config, ["training.data.input_size=33,49", "version=2", "backbone.width=64"])
    torch.manual_seed(3)
    model = build_model("2", 8, "imagenet", 18, None, verbose=False)
    path = os.path.join(str(tmp_path_factory.mktemp("ckpt")), "best_model.pth")
    torch.save({"model": model.state_dict(), "config": cfg, "iteration": 5}, path)
    return path, model.eval()


def reference_predictions(model) -> tuple[list[np.ndarray], float]:
    """The paper's protocol computed here: (x - 127.5) / 255, one forward, bilinear upsampling, argmax; and the
    mean cross-entropy over labeled pixels."""
    val = SyntheticStreets(3, SIZE, seed_offset=1, train=False)
    out, loss, pixels = [], 0.0, 0
    with torch.no_grad():
        for i in range(3):
            image, label = val.scene(i)
            x = (torch.tensor(image).permute(2, 0, 1).float().unsqueeze(0) - 127.5) / 255.0
            logits = F.interpolate(model(x), size=SIZE, mode="bilinear", align_corners=True)
            out.append(logits.argmax(1)[0].numpy())
            target = torch.from_numpy(label.astype(np.int64)).unsqueeze(0)
            loss += float(F.cross_entropy(logits, target, ignore_index=250, reduction="sum"))
            pixels += int((target != 250).sum())
    return out, loss / pixels


def iou_by_hand(preds: list[np.ndarray], labels: list[np.ndarray], classes: int) -> list[float]:
    inter, union = np.zeros(classes), np.zeros(classes)
    for p, t in zip(preds, labels):
        valid = t < classes
        for c in range(classes):
            inter[c] += np.sum((p == c) & (t == c) & valid)
            union[c] += np.sum(((p == c) | (t == c)) & valid)
    return [inter[c] / union[c] if union[c] else math.nan for c in range(classes)]


def test_saved_predictions_overlays_and_summary(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "pred"
    report = evaluateSSL.main(["--model-path", path, "--device", "cpu", "--save-output-images", str(out)])
    printed = capsys.readouterr().out
    names = [f"synthetic_1_{i:05d}" for i in range(3)]
    assert sorted(os.listdir(out)) == sorted([n + ".png" for n in names] + [n + "_overlay.jpg" for n in names]
                                             + ["summary.txt"])
    expected, loss = reference_predictions(model)
    val = SyntheticStreets(3, SIZE, seed_offset=1, train=False)
    for i, name in enumerate(names):
        saved = Image.open(out / f"{name}.png")
        assert saved.mode == "P" and saved.getpalette()[:24] == [v for c in PALETTE for v in c]
        assert np.array_equal(np.asarray(saved), expected[i])  # pixel values are the predicted classes
        blend = np.asarray(Image.open(out / f"{name}_overlay.jpg").convert("RGB")).astype(float)
        image = val.scene(i)[0].astype(float)
        colours = np.array(PALETTE, dtype=float)[expected[i]]
        error = np.abs(blend - (image + colours) / 2).mean()  # JPEG is lossy: a few levels on average
        assert blend.shape == (*SIZE, 3) and error < 8 and error < np.abs(blend - image).mean() / 4
    # the summary: per-class IoU worst first, absent classes apart, mIoU
    labels = [val.scene(i)[1] for i in range(3)]
    iou = iou_by_hand(expected, labels, 8)
    present = sorted(((v, n) for n, v in zip(CLASS_NAMES, iou) if not math.isnan(v)), key=lambda vn: vn[0])
    assert len({v for v, _ in present}) > 1  # not all equal, so the order is tested
    assert [n for n, _ in report["iou_worst_first"]] == [n for _, n in present]
    assert report["miou"] == pytest.approx(np.nanmean(iou)) and report["loss"] == pytest.approx(loss, rel=1e-4)
    summary = (out / "summary.txt").read_text()
    assert summary in printed
    rows = [ln.split() for ln in summary.splitlines()[1:1 + len(present)]]
    assert [r[0] for r in rows] == [n for _, n in present]
    assert [float(r[1]) for r in rows] == pytest.approx([100 * v for v, _ in present], abs=0.006)
    saved = json.load(open(path.replace(".pth", "_evaluation.json")))
    assert saved["protocol"] == "whole" and saved["iteration"] == 5


def test_sliding_protocol(checkpoint, capsys):
    path, model = checkpoint
    expected, loss = reference_predictions(model)
    labels = [SyntheticStreets(3, SIZE, seed_offset=1, train=False).scene(i)[1] for i in range(3)]
    # windows as large as the images: the whole-image protocol's predictions, IoU and loss
    one_window = evaluateSSL.main(["--model-path", path, "--device", "cpu", "--protocol", "sliding",
                                   "--set", "training.data.input_size=40,60"])
    assert list(one_window["iou"].values()) == pytest.approx(iou_by_hand(expected, labels, 8), nan_ok=True)
    assert one_window["loss"] == pytest.approx(loss, rel=1e-4)
    # crop-sized windows (33x49 of 40x60): a valid, different evaluation
    windows = evaluateSSL.main(["--model-path", path, "--device", "cpu", "--protocol", "sliding"])
    assert windows["protocol"] == "sliding" and windows["loss"] != one_window["loss"]
    present = [v for v in windows["iou"].values() if not math.isnan(v)]
    assert present and windows["miou"] == pytest.approx(sum(present) / len(present), rel=1e-12)
    assert "protocol sliding" in capsys.readouterr().out


def test_saved_predictions_are_unique_per_relative_path(checkpoint, tmp_path, capsys):
    """Validation images a/img.png and b/img.png (one file name in two folders, two different scenes): both
    predictions and overlays are written, under their folders, the overlay of each blending its own image (before:
    one overwrote the other; "wrote ... of 2 images" with one written)."""
    path, model = checkpoint
    stored = torch.load(path, weights_only=True)["config"]["folder"]
    images, labels = tmp_path / "val" / "images", tmp_path / "val" / "labels"
    scenes = SyntheticStreets(2, SIZE, seed_offset=1, train=False)
    for k, folder in enumerate(("a", "b")):
        for src, dst in ((stored["val_images"], images), (stored["val_labels"], labels)):
            (dst / folder).mkdir(parents=True, exist_ok=True)
            Image.open(os.path.join(src, f"synthetic_1_{k:05d}.png")).save(dst / folder / "img.png")
    out = tmp_path / "pred"
    evaluateSSL.main(["--model-path", path, "--device", "cpu", "--save-output-images", str(out),
                      "--set", f"folder.val_images={images}", "--set", f"folder.val_labels={labels}"])
    assert f"wrote predictions and overlays of 2 images to {out}" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["a", "b", "summary.txt"]
    expected, _ = reference_predictions(model)
    for k, folder in enumerate(("a", "b")):
        assert sorted(os.listdir(out / folder)) == ["img.png", "img_overlay.jpg"]
        assert np.array_equal(np.asarray(Image.open(out / folder / "img.png")), expected[k])
        blend = np.asarray(Image.open(out / folder / "img_overlay.jpg").convert("RGB")).astype(float)
        colours = np.array(PALETTE, dtype=float)[expected[k]]
        own, other = (np.abs(blend - (scenes.scene(j)[0].astype(float) + colours) / 2).mean() for j in (k, 1 - k))
        assert own < 8 < other  # this overlay is of its own image, not of the other one


def test_a_read_only_checkpoint_folder_puts_the_report_elsewhere(checkpoint, tmp_path, monkeypatch, capsys):
    """The checkpoint's folder cannot be written (a read-only archive; simulated: the write test there fails with
    EROFS): evaluateSSL.py says so before evaluating and writes the report in the current folder; when that fails
    too, it prints the results and says the report was not written — no traceback after the mIoU."""
    import errno
    import tempfile
    path, _ = checkpoint
    folder = os.path.dirname(os.path.abspath(path))
    real = tempfile.mkstemp
    blocked = {folder}

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) in blocked:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.chdir(tmp_path)
    before = os.listdir(folder)
    evaluateSSL.main(["--model-path", path, "--device", "cpu"])
    out = capsys.readouterr().out
    name = f"{os.path.basename(folder)}_best_model_evaluation.json"
    note = f"note: cannot write the folder {folder}: Read-only file system; the report goes to {name} instead"
    assert note in out and out.index(note) < out.index("mIoU") and f"wrote {name}" in out
    assert json.load(open(tmp_path / name))["iteration"] == 5 and os.listdir(folder) == before
    blocked.add(str(tmp_path))
    report = evaluateSSL.main(["--model-path", path, "--device", "cpu"])
    out = capsys.readouterr().out
    assert "best_model_evaluation.json will not be written" in out and "not written (see the note above)" in out
    assert report["iteration"] == 5


class _Items(torch.utils.data.Dataset):
    """Validation items as the datasets return them: (image [3,h,w] 0..255, label [h,w] int64, name); sizes differ
    from item 2 on; item `bad` fails as an unreadable file does (a UserError naming it)."""

    def __init__(self, n: int = 5, bad: int | None = None):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        from utils.errors import UserError
        if k == self.bad:
            raise UserError(f"cannot read image item{k}.png: planted")
        h, w = (6, 8) if k < 2 else (5, 9)
        g = torch.Generator().manual_seed(k)
        label = torch.randint(0, 4, (h, w), generator=g)
        label[0, 0] = 250  # ignored
        return torch.rand(3, h, w, generator=g) * 255, label, f"item{k}"


class _Constant(torch.nn.Module):
    """Logits (0, 2, 0, 0) everywhere: class 1 predicted at every pixel, whatever the image."""

    def forward(self, x):
        return torch.tensor([0.0, 2.0, 0.0, 0.0]).view(1, 4, 1, 1).expand(x.shape[0], 4, *x.shape[2:])


def test_evaluation_loads_through_workers_alike():
    """engine.evaluation.evaluate reads its items through a DataLoader: with 2 worker processes the result equals
    that with none and the values worked out by hand (class 1 everywhere: confusion column 1 holds each class's
    pixel count; loss -log softmax(logits)[label] = log(3 + e^2) - 2 [label 1] or log(3 + e^2) [else]); the items
    come in order; the global RNG is untouched (a run's augmentation draws must not depend on evaluations); cuDNN's
    benchmark is off from the first item of a second size on and restored after."""
    from engine.evaluation import evaluate
    items = _Items()
    labels = torch.cat([items[k][1].flatten() for k in range(len(items))])
    valid = labels[labels < 4]
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[:, 1] = torch.bincount(valid, minlength=4)
    z = math.log(3 + math.e ** 2)
    expected_loss = float(sum(z - 2 if c == 1 else z for c in valid.tolist())) / len(valid)
    before, saved = torch.get_rng_state(), torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        results = {}
        for workers in (0, 2):
            seen = []
            results[workers] = evaluate(_Constant(), items, num_classes=4, ignore_label=250, mean_rgb=(0, 0, 0),
                                        channel_order="RGB", device=torch.device("cpu"), num_workers=workers,
                                        on_prediction=lambda name, *_: seen.append(
                                            (name, torch.backends.cudnn.benchmark)))
            assert seen == [("item0", True), ("item1", True), ("item2", False), ("item3", False), ("item4", False)]
            assert torch.backends.cudnn.benchmark
        assert torch.equal(torch.get_rng_state(), before)
    finally:
        torch.backends.cudnn.benchmark = saved
    for result in results.values():
        assert torch.equal(result["confusion"], expected)
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert results[0]["loss"] == results[2]["loss"] and results[0]["miou"] == results[2]["miou"]


def test_a_bad_validation_file_in_a_worker_names_the_file():
    from engine.evaluation import evaluate
    from utils.errors import UserError
    with pytest.raises(UserError) as caught:
        evaluate(_Constant(), _Items(bad=3), num_classes=4, ignore_label=250, mean_rgb=(0, 0, 0),
                 channel_order="RGB", device=torch.device("cpu"), num_workers=2)
    assert str(caught.value) == "cannot read image item3.png: planted"
