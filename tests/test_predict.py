"""predict.py: pictures of a user's own images (any size, the folder dataset's formats), an unreadable image named and
skipped, and class maps identical to the predictions evaluateSSL.py scores."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluateSSL
import predict
from data import CityscapesDataset, dataset_info
from data.common import image_tensor, read_image
from data.synthetic import PALETTE, SyntheticStreets, export_folder
from model import build_model
from tests.fixtures_data import make_cityscapes_tree
from tests.test_resume import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from engine.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (40, 60)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A DeepLabv2 ResNet-18 with Kaiming-initialised convolutions (the released N(0, 0.01) init predicts one class
    everywhere; these weights predict several, so that comparisons of class maps mean something) and the config of
    a folder dataset of 3 synthetic validation scenes."""
    config = export_folder(str(tmp_path_factory.mktemp("data")), num_train=4, num_val=3, image_size=SIZE)
    # the exported config is the demo's (backbone.width 32); these checkpoints hold a standard-width network
    cfg = load_config(config, ["training.data.input_size=33,49", "version=2", "backbone.width=64"])
    torch.manual_seed(3)
    model = build_model("2", 8, "imagenet", 18, None, verbose=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    path = os.path.join(str(tmp_path_factory.mktemp("ckpt")), "best_model.pth")
    torch.save({"model": model.state_dict(), "config": cfg, "iteration": 5}, path)
    return path, model.eval()


def reference_classes(model, image: np.ndarray) -> np.ndarray:
    """The paper's protocol by hand for the demo's RGB/127.5 preprocessing: one forward, bilinear upsampling
    (align_corners) to the image size, argmax."""
    x = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float().unsqueeze(0) - 127.5) / 255.0
    with torch.no_grad():
        logits = F.interpolate(model(x), size=image.shape[:2], mode="bilinear", align_corners=True)
    return logits.argmax(1)[0].numpy()


def test_folder_with_an_unreadable_image(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    inputs, out = tmp_path / "photos", tmp_path / "out"
    (inputs / "street").mkdir(parents=True)
    scenes = SyntheticStreets(2, (52, 76), seed_offset=7, train=False)  # another size than in training
    Image.fromarray(scenes.scene(0)[0]).save(inputs / "a.png")
    Image.fromarray(scenes.scene(1)[0][:45, :67]).save(inputs / "street" / "b.jpg", quality=95)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")

    with pytest.raises(SystemExit) as exit_status:
        predict.cli(["--model-path", path, "--input", str(inputs), "--out", str(out), "--overlay", "--device", "cpu"])
    assert exit_status.value.code == 1
    captured = capsys.readouterr()
    assert f"skipped {inputs / 'broken.png'}: cannot read image file" in captured.err
    assert "1 of 3 images failed" in captured.err and f"of 2 images to {out}" in captured.out
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files)
    assert written == ["a_classes.png", "a_color.png", "a_overlay.jpg",
                       "street/b_classes.png", "street/b_color.png", "street/b_overlay.jpg"]
    for stem, source in (("a", inputs / "a.png"), ("street/b", inputs / "street" / "b.jpg")):
        image = np.asarray(Image.open(source).convert("RGB"))
        classes = Image.open(out / f"{stem}_classes.png")
        assert classes.mode == "L" and classes.size == (image.shape[1], image.shape[0])
        expected = reference_classes(model, image)
        assert len(np.unique(expected)) > 1
        assert np.array_equal(np.asarray(classes), expected)
        color = Image.open(out / f"{stem}_color.png")
        assert color.mode == "P" and np.array_equal(np.asarray(color), expected)
        assert np.array_equal(np.asarray(color.convert("RGB")), np.array(PALETTE, dtype=np.uint8)[expected])
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.jpg").convert("RGB")).astype(float)
        blend = (image.astype(float) + np.array(PALETTE, dtype=float)[expected]) / 2
        assert overlay.shape == image.shape and np.abs(overlay - blend).mean() < 8  # JPEG: a few levels off


@pytest.mark.parametrize("protocol", ["whole", "sliding"])
def test_class_maps_are_the_predictions_evaluateSSL_scores(checkpoint, tmp_path, protocol):
    path, model = checkpoint
    val_images = torch.load(path, weights_only=True)["config"]["folder"]["val_images"]
    evaluateSSL.main(["--model-path", path, "--device", "cpu", "--protocol", protocol,
                      "--save-output-images", str(tmp_path / "evaluate")])
    predict.cli(["--model-path", path, "--input", val_images, "--out", str(tmp_path / "predict"), "--device", "cpu",
                 "--protocol", protocol])
    names = sorted(n[:-4] for n in os.listdir(val_images))
    assert len(names) == 3
    for name in names:
        scored = np.asarray(Image.open(tmp_path / "evaluate" / f"{name}.png"))  # palette PNG: values are classes
        assert np.array_equal(np.asarray(Image.open(tmp_path / "predict" / f"{name}_classes.png")), scored)
        whole = reference_classes(model, np.asarray(Image.open(os.path.join(val_images, name + ".png"))))
        assert len(np.unique(scored)) > 1 and np.array_equal(scored, whole) == (protocol == "whole")


def test_inputs_one_image_or_a_list(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ("x/one.png", "two.webp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# my images\nx/one.png\n\ntwo.webp\n")
    assert predict.list_inputs(str(tmp_path / "list.txt")) == [(str(tmp_path / "x/one.png"), "x/one"),
                                                               (str(tmp_path / "two.webp"), "two")]
    assert predict.list_inputs(str(tmp_path / "x/one.png")) == [(str(tmp_path / "x/one.png"), "one")]
    (tmp_path / "x" / "out").mkdir()
    (tmp_path / "x" / "out" / "one_color.png").write_bytes(b"")  # an earlier run's output inside the input folder
    assert predict.list_inputs(str(tmp_path / "x"), str(tmp_path / "x" / "out")) == [(str(tmp_path / "x/one.png"),
                                                                                      "one")]
    (tmp_path / "clash.txt").write_text("x/one.png\nx/one.png\n")
    with pytest.raises(predict.UserError, match="would write the same outputs x/one_"):
        predict.list_inputs(str(tmp_path / "clash.txt"))


@pytest.mark.parametrize("version", ["2", "3"])
def test_the_evaluation_resize_comes_from_the_config(tmp_path, version):
    """Cityscapes DeepLabv2 evaluates half-size images (upsampled to full size): predict.py's input is the
    validation set's input for the same file."""
    files = make_cityscapes_tree(str(tmp_path), n_train=0, n_val=1, size=(21, 30))
    cfg = load_config(os.path.join(ROOT, "configs", "configSSL_city_1_30_split0_COCO.json"), [f"version={version}"])
    info = dataset_info(cfg)
    image = read_image(files["val"][0][0])
    val_image = CityscapesDataset(str(tmp_path), "val", version, channel_order=info.channel_order)[0][0]
    assert val_image.shape == ((3, 10, 15) if version == "2" else (3, 21, 30))
    assert torch.equal(image_tensor(info.prepare(image), info.channel_order), val_image)
    assert info.channel_order == "BGR" and info.num_classes == 19 and len(info.palette) == 19


def test_an_image_without_a_listed_extension_is_read_as_an_image(checkpoint, tmp_path):
    """--input x.gif (a file of another extension that is an image) is predicted as one image, the same classes
    as the same pixels in a PNG; a binary file that is no image is refused with a message, not read as a list."""
    path, model = checkpoint
    image = SyntheticStreets(1, (44, 64), seed_offset=9, train=False).scene(0)[0]
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(image).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "x.gif")
    gif_pixels = np.asarray(Image.open(tmp_path / "x.gif").convert("RGB"))
    assert predict.list_inputs(str(tmp_path / "x.gif")) == [(str(tmp_path / "x.gif"), "x")]
    result = predict.main(["-m", path, "--input", str(tmp_path / "x.gif"), "--out", str(tmp_path / "out"),
                           "--device", "cpu"])
    assert result["failed"] == [] and len(result["written"]) == 2
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x_classes.png")),
                          reference_classes(model, gif_pixels))
    (tmp_path / "x.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(predict.UserError, match=r"--input .*x\.bin is neither an image Pillow can read nor a text "
                                                r"file of image paths"):
        predict.list_inputs(str(tmp_path / "x.bin"))
