"""Networks (SPEC 3): state-dict names/shapes, output sizes, the v2 classifier presets, frozen BN, optimiser
groups, the released init, pretrained loading and strict checkpoint loading. CPU, random init, tiny inputs;
large models are built on the meta device where only names and shapes matter."""
import os
import urllib.error

import pytest
import torch
from torch import nn

from model import DeepLabV2, DeepLabV3Plus, build_model
from model.checkpoint_io import load_state_strict
from model.heads import BACKBONE_MODULES
from model.pretrained import COCO_FILE, COCO_URL, load_pretrained
from model.resnet import ResNetBackbone
from utils.errors import UserError



def tv_models():
    """torchvision.models, imported on first use (its import costs a test worker seconds)."""
    import torchvision
    return torchvision.models

def _meta(*args, **kwargs):
    with torch.device("meta"):
        return build_model(*args, **kwargs)


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _backbone_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: s for k, s in _shapes(model).items() if k.split(".")[0] in BACKBONE_MODULES}


def _torchvision_shapes(depth: int) -> dict[str, tuple]:
    with torch.device("meta"):
        net = getattr(tv_models(), f"resnet{depth}")()
    return {k: s for k, s in _shapes(net).items() if not k.startswith("fc.")}


# ---------------------------------------------------------------- names and shapes

def test_v2_coco_101_released_names_and_shapes():
    C = 19
    s = _shapes(_meta("2", C, "COCO"))
    expected = {
        "conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.weight": (256,), "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer3.22.conv3.weight": (1024, 256, 1, 1), "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "layer4.2.conv2.weight": (512, 512, 3, 3), "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "layer4.2.bn3.bias": (2048,),
        "layer5.conv2d_list.0.weight": (C, 2048, 3, 3), "layer5.conv2d_list.3.weight": (C, 2048, 3, 3),
        "layer5.conv2d_list.3.bias": (C,),
        "projection_head.0.weight": (256, 2048), "projection_head.1.running_mean": (256,),
        "projection_head.3.weight": (256, 256), "prediction_head.0.weight": (256, 256),
        "prediction_head.3.bias": (256,),
        "contrastive_class_selector_0.0.weight": (256, 256), "contrastive_class_selector_0.1.weight": (256,),
        "contrastive_class_selector_0.3.weight": (1, 256),
        f"contrastive_class_selector_memory{C - 1}.3.weight": (1, 256),
        f"contrastive_class_selector_memory{C - 1}.3.bias": (1,),
    }
    for name, shape in expected.items():
        assert s[name] == shape, name
    assert "layer3.23.conv1.weight" not in s and "layer5.conv2d_list.4.weight" not in s
    assert f"contrastive_class_selector_{C}.0.weight" not in s
    assert "contrastive_class_selector_memory_0.0.weight" not in s      # released name has no underscore
    # every selector: 2 Linear (w, b) + BN1d (w, b, mean, var, count) = 9 entries; 2C selectors
    assert sum(k.startswith("contrastive_class_selector_") for k in s) == 2 * C * 9
    # ResNet-101 backbone of the COCO variant has torchvision's names and shapes exactly (the file loads by name)
    assert _backbone_shapes(_meta("2", C, "COCO")) == _torchvision_shapes(101)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_torchvision_variant_backbone_equals_torchvision(depth):
    tv = _torchvision_shapes(depth)
    for version in ("2", "3"):
        model = _meta(version, 7, "imagenet", depth)
        assert _backbone_shapes(model) == tv
    # 120 / 216 / 318 / 624 backbone tensors (torchvision's state dict without fc)
    assert len(tv) == {18: 120, 34: 216, 50: 318, 101: 624}[depth]


@pytest.mark.parametrize("depth", [18, 34])
def test_coco_basic_block_variant_adds_layer1_projection(depth):
    s = _backbone_shapes(_meta("2", 4, "COCO", depth))
    tv = _torchvision_shapes(depth)
    extra = {k: v for k, v in s.items() if k not in tv}
    # torchvision has no layer1 shortcut for basic blocks; the COCO variant gives every first block one
    assert extra == {"layer1.0.downsample.0.weight": (64, 64, 1, 1), "layer1.0.downsample.1.weight": (64,),
                     "layer1.0.downsample.1.bias": (64,), "layer1.0.downsample.1.running_mean": (64,),
                     "layer1.0.downsample.1.running_var": (64,), "layer1.0.downsample.1.num_batches_tracked": ()}
    assert all(s[k] == v for k, v in tv.items())
    m = _meta("2", 4, "COCO", depth)
    assert m.feature_channels == 512 and _shapes(m)["layer5.conv2d_list.0.weight"] == (4, 512, 3, 3)
    assert _shapes(m)["projection_head.0.weight"] == (256, 512)


@pytest.mark.parametrize("depth,low,high", [(50, 256, 2048), (101, 256, 2048), (18, 64, 512)])
def test_v3plus_names_and_shapes(depth, low, high):
    C = 21
    s = _shapes(_meta("3", C, "imagenet", depth))
    expected = {
        "aspp.aspp1.atrous_conv.weight": (256, high, 1, 1), "aspp.aspp1.bn.weight": (256,),
        "aspp.aspp2.atrous_conv.weight": (256, high, 3, 3), "aspp.aspp4.atrous_conv.weight": (256, high, 3, 3),
        "aspp.global_avg_pool.1.weight": (256, high, 1, 1), "aspp.global_avg_pool.2.weight": (256,),
        "aspp.conv1.weight": (256, 1280, 1, 1), "aspp.bn1.bias": (256,),
        "decoder.conv1.weight": (48, low, 1, 1), "decoder.bn1.weight": (48,),
        "decoder.pre_last_conv.0.weight": (256, 304, 3, 3), "decoder.pre_last_conv.1.weight": (256,),
        "decoder.pre_last_conv.3.weight": (256, 256, 3, 3), "decoder.pre_last_conv.4.bias": (256,),
        "decoder.last_conv.weight": (C, 256, 1, 1), "decoder.last_conv.bias": (C,),
        "projection_head.0.weight": (256, 256), f"contrastive_class_selector_memory{C - 1}.3.weight": (1, 256),
    }
    for name, shape in expected.items():
        assert s[name] == shape, name
    assert not any(k.startswith("layer5") for k in s)
    heads = [k for k in s if k.split(".")[0] not in BACKBONE_MODULES]
    # ASPP 4x(conv + 5 BN) + pool (conv + 5 BN) + conv1 + 5 BN = 36; decoder conv1 + 5 BN + 2x(conv + 5) + 2 = 20;
    # projection/prediction 2 Linear (4) + BN1d (5) = 9 each; 2C selectors x 9
    assert len(heads) == 36 + 20 + 2 * 9 + 2 * C * 9


# ---------------------------------------------------------------- output sizes

@pytest.mark.parametrize("version,pretraining,size,expected", [
    # 64: conv1 (64+6-7)//2+1 = 32; max-pool ceil((32-1)/2)+1 = 17 (coco) vs (32-1)//2+1 = 16 (torchvision);
    #     layer2 stride 2: (17-1)//2+1 = 9 vs (16-1)//2+1 = 8; layer3/4 dilated keep it.
    ("2", "COCO", 64, 9), ("2", "imagenet", 64, 8),
    # 129: conv1 65; pool ceil(64/2)+1 = 33 = 64//2+1; layer2 (33-1)//2+1 = 17 for both
    ("2", "COCO", 129, 17), ("2", "imagenet", 129, 17),
    # v3+: logits and features at the layer1 size: 64 -> 16, 129 -> 33
    ("3", "imagenet", 64, 16), ("3", "imagenet", 129, 33),
])
def test_output_sizes_depth18(version, pretraining, size, expected):
    torch.manual_seed(0)
    model = build_model(version, 3, pretraining, 18).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(1, 3, size, size), return_features=True)
        plain = model(torch.randn(1, 3, size, size))
    F = 512 if version == "2" else 256
    assert logits.shape == (1, 3, expected, expected) and plain.shape == logits.shape
    assert feats.shape == (1, F, expected, expected)
    assert model.feature_channels == F and model.output_stride == (8 if version == "2" else 4)


@pytest.mark.parametrize("version,pretraining,depth,expected", [
    # 512: conv1 256; coco pool ceil(255/2)+1 = 129, layer2 65; torchvision pool 128, layer2 64 (SPEC 3)
    ("2", "COCO", 101, 65), ("2", "imagenet", 101, 64), ("3", "imagenet", 50, 128),
])
def test_output_sizes_512_released_depths(version, pretraining, depth, expected):
    model = _meta(version, 19, pretraining, depth)
    logits, feats = model(torch.zeros(2, 3, 512, 512, device="meta"), return_features=True)
    assert logits.shape == (2, 19, expected, expected)
    assert feats.shape == (2, 2048 if version == "2" else 256, expected, expected)


def test_non_square_input_v3plus_train_mode():
    torch.manual_seed(0)
    model = build_model("3", 2, "imagenet", 18).train()
    logits, feats = model(torch.randn(2, 3, 64, 96), return_features=True)
    assert logits.shape == (2, 2, 16, 24) and feats.shape == (2, 256, 16, 24)
    assert (feats >= 0).all()      # features are taken after the decoder's ReLU


# ---------------------------------------------------------------- dilation / strides

def test_v2_dilation_and_strides():
    model = _meta("2", 3, "COCO", 50)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and name.split(".")[0] in BACKBONE_MODULES[2:]:
            layer = int(name[5])
            d = {1: 1, 2: 1, 3: 2, 4: 4}[layer]
            assert m.dilation == (d, d) and m.padding == (d, d), name
            assert m.stride == (1, 1), name            # coco: strides sit on the 1x1 convs
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].downsample[0].stride == (2, 2)
    assert model.layer3[0].conv1.stride == (1, 1) and model.layer4[0].downsample[0].stride == (1, 1)
    assert model.maxpool.ceil_mode is True
    tv = _meta("2", 3, "imagenet", 50)
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)
    assert tv.layer3[0].conv2.dilation == (2, 2) and tv.layer4[0].conv2.dilation == (4, 4)
    assert tv.maxpool.ceil_mode is False
    dil = [(m.dilation, m.padding) for m in model.layer5.conv2d_list]
    assert dil == [((d, d), (d, d)) for d in (6, 12, 18, 24)]


def test_torchvision_backbones_compute_like_torchvision():
    """Same weights -> same layer4 output as torchvision's own ResNet (plain and output-stride-16 forms). In the
    output-stride-16 form the release dilates layer4's first block too, where torchvision's
    replace_stride_with_dilation keeps dilation 1: the reference gets that one conv's dilation and padding 2."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    os16 = tv_models().resnet50(replace_stride_with_dilation=[False, False, True])
    assert os16.layer4[0].conv2.dilation == (1, 1)
    os16.layer4[0].conv2.dilation, os16.layer4[0].conv2.padding = (2, 2), (2, 2)
    cases = [(ResNetBackbone(18, "torchvision"), tv_models().resnet18()),
             (ResNetBackbone(50, "torchvision", dilate_layer4=2), os16)]
    for ours, ref in cases:
        missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
        assert missing == [] and unexpected == ["fc.weight", "fc.bias"]
        ours.eval(), ref.eval()
        with torch.no_grad():
            _, got = ours(x)
            r = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
            want = ref.layer4(ref.layer3(ref.layer2(ref.layer1(r))))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- classifier presets

@pytest.mark.parametrize("branches", [2, 4])
def test_v2_classifier_sums_the_preset_branches(branches):
    torch.manual_seed(0)
    model = build_model("2", 3, "COCO", 18, v2_branches=branches).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        convs = model.layer5.conv2d_list
        branch = [c(feats) for c in convs]
        expected = branch[0] + branch[1]
        if branches == 4:
            expected = expected + branch[2] + branch[3]
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert len(convs) == 4                                  # all four exist in the state dict either way
    # the branches left out do change the sum (the test can tell the presets apart)
    assert (branch[2] + branch[3]).abs().max() > 1e-4


def test_v2_code_preset_leaves_two_branches_without_gradient():
    torch.manual_seed(0)
    model = build_model("2", 3, "COCO", 18, v2_branches=2).train()
    model(torch.randn(2, 3, 48, 48)).sum().backward()
    grads = [c.weight.grad for c in model.layer5.conv2d_list]
    assert grads[0] is not None and grads[1] is not None and grads[2] is None and grads[3] is None


# ---------------------------------------------------------------- BN, optimiser groups, init

def test_backbone_bn_frozen_but_in_train_mode():
    torch.manual_seed(0)
    model = build_model("3", 3, "imagenet", 18).train()
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            frozen = name.split(".")[0] in BACKBONE_MODULES
            assert m.weight.requires_grad is (not frozen) and m.bias.requires_grad is (not frozen), name
            assert m.training, name
    before = model.layer1[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, model.layer1[0].bn1.running_mean)   # batch statistics were used
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("projection", "contrastive")))


@pytest.mark.parametrize("version,pretraining,n_backbone", [
    ("2", "COCO", 21),       # conv1 + 16 block convs + 4 shortcuts (every layer, COCO variant)
    ("2", "imagenet", 20),   # torchvision: shortcuts in layer2..4 only
    ("3", "imagenet", 20),
])
def test_optim_parameters_one_group(version, pretraining, n_backbone):
    """The release's optim_parameters: ONE group at the base lr with every trainable parameter, each once, in
    its order: backbone, classifier/decoder, projection, prediction, then (feature c, memory c) per class."""
    C = 3
    model = build_model(version, C, pretraining, 18)
    groups = model.optim_parameters(0.01)
    assert len(groups) == 1 and groups[0]["lr"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for p in groups[0]["params"]]
    assert len(order) == len(set(order)) == sum(p.requires_grad for p in model.parameters())
    # v2: layer5 4 x (w, b); v3+: ASPP 4 x (conv, BN w, b) + pool (3) + conv1/bn1 (3) = 18, decoder
    # conv1/bn1 (3) + pre_last_conv 0, 1 (w, b), 3, 4 (w, b) + last_conv (w, b) = 11. Projection and prediction
    # heads: 2 Linear (w, b) + BN1d (w, b) = 6 each, and 2C selectors of 6 each.
    decoder = 8 if version == "2" else 18 + 11
    assert len(order) == n_backbone + decoder + 2 * 6 + 2 * C * 6
    assert all(n.split(".")[0] in BACKBONE_MODULES for n in order[:n_backbone])
    assert all(n.startswith(("layer5.", "aspp.", "decoder.")) for n in order[n_backbone:n_backbone + decoder])
    heads = [n.split(".")[0] for n in order[n_backbone + decoder:]]
    expected = ["projection_head"] * 6 + ["prediction_head"] * 6
    for c in range(C):
        expected += [f"contrastive_class_selector_{c}"] * 6 + [f"contrastive_class_selector_memory{c}"] * 6
    assert heads == expected


def test_released_init():
    torch.manual_seed(0)
    model = build_model("3", 3, "imagenet", 50)
    for name in ("layer4.0.conv2.weight", "aspp.aspp2.atrous_conv.weight", "decoder.pre_last_conv.3.weight"):
        w = model.state_dict()[name]
        assert abs(w.std().item() - 0.01) < 2e-4 and abs(w.mean().item()) < 1e-4, name
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    # Linear layers keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std = bound / sqrt(3)
    w = model.projection_head[0].weight
    bound = 1 / 256 ** 0.5
    assert w.abs().max() <= bound and abs(w.std().item() - bound / 3 ** 0.5) < 1e-3
    v2 = build_model("2", 3, "COCO", 18)
    w = v2.layer5.conv2d_list[1].weight
    assert abs(w.std().item() - 0.01) < 1e-3


def test_selector_accessors():
    model = _meta("2", 4, "COCO", 18)
    assert isinstance(model, DeepLabV2) and isinstance(_meta("3", 4, "imagenet", 18), DeepLabV3Plus)
    feats, mems = model.feature_selectors(), model.memory_selectors()
    assert len(feats) == len(mems) == 4
    assert feats[2] is model.contrastive_class_selector_2 and mems[3] is model.contrastive_class_selector_memory3
    assert [type(m) for m in feats[0]] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear]
    assert feats[0][2].negative_slope == 0.2
    assert [type(m) for m in model.projection_head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


# ---------------------------------------------------------------- build_model errors

@pytest.mark.parametrize("kwargs,needle", [
    (dict(version="4", num_classes=3), "\"2\""), (dict(version="2", num_classes=3, depth=42), "101"),
    (dict(version="2", num_classes=3, pretraining="ade"), "imagenet"),
    (dict(version="2", num_classes=3, depth=18, v2_branches=3), "4"),
])
def test_build_model_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        build_model(**kwargs)


# ---------------------------------------------------------------- pretrained weights

def test_pretrained_coco_style_file(tmp_path, capsys):
    torch.manual_seed(0)
    src = build_model("2", 5, "COCO", 18)
    state = {"Scale." + k: v.clone() for k, v in src.state_dict().items()
             if k.split(".")[0] in BACKBONE_MODULES + ("layer5",)}
    state["Scale.layer5.conv2d_list.0.weight"] = torch.randn(21, 512, 3, 3)    # wrong class count
    state["Scale.fc.weight"] = torch.randn(10, 512)                            # not in the model
    path = tmp_path / "coco_like.pth"
    torch.save(state, path)

    torch.manual_seed(1)
    model = build_model("2", 5, "COCO", 18, str(path))
    report = model.pretrained_report
    assert report.loaded == len(state) - 2
    reasons = dict(report.skipped)
    assert set(reasons) == {"layer5.conv2d_list.0.weight", "fc.weight"}
    assert "shape mismatch" in reasons["layer5.conv2d_list.0.weight"] and reasons["fc.weight"] == "missing in model"
    out = capsys.readouterr().out
    assert f"loaded {len(state) - 2} tensors" in out and "layer5.conv2d_list.0.weight" in out
    got, want = model.state_dict(), src.state_dict()
    assert torch.equal(got["layer3.1.conv2.weight"], want["layer3.1.conv2.weight"])
    assert torch.equal(got["layer5.conv2d_list.1.weight"], want["layer5.conv2d_list.1.weight"])
    assert not torch.equal(got["layer5.conv2d_list.0.weight"], want["layer5.conv2d_list.0.weight"])
    assert not torch.equal(got["projection_head.0.weight"], want["projection_head.0.weight"])   # not in file

    # wrapped {"state_dict": ...} with DDP "module." prefixes loads the same way
    torch.save({"state_dict": {"module." + k[len("Scale."):]: v for k, v in state.items()}}, path)
    again = build_model("2", 5, "COCO", 18, str(path), verbose=False)
    assert again.pretrained_report.loaded == len(state) - 2
    assert torch.equal(again.state_dict()["layer1.0.downsample.0.weight"], want["layer1.0.downsample.0.weight"])


def test_pretrained_none_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, **kwargs):  # "default" weights not cached: the download fails as it does without network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    model = build_model("2", 3, "COCO", 18, "none")
    assert model.pretrained_report is None
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="nope.pth"):
        load_pretrained(model, str(missing), "2", "COCO", 18)
    expected_path = os.path.join(str(tmp_path), "checkpoints", COCO_FILE)
    with pytest.raises(UserError) as err:
        load_pretrained(model, "default", "2", "COCO", 101)
    assert expected_path in str(err.value) and COCO_URL in str(err.value)
    with pytest.raises(UserError, match="resnet50-19c8e357.pth"):
        load_pretrained(model, "default", "3", "imagenet", 50)
    with pytest.raises(UserError, match="no default COCO weights"):
        build_model("2", 3, "COCO", 18, "default")


def test_pretrained_default_imagenet_file(tmp_path, monkeypatch):
    """torchvision's file at torch hub's checkpoint folder: every backbone tensor loads, fc is skipped."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(0)
    tv = tv_models().resnet18()
    os.makedirs(tmp_path / "checkpoints")
    torch.save(tv.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_model("3", 4, "imagenet", 18, "default", verbose=False)
    report = model.pretrained_report
    assert report.loaded == 120 and sorted(n for n, _ in report.skipped) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.layer2[0].downsample[0].weight, tv.layer2[0].downsample[0].weight)
    assert not any(n.split(".")[0] in BACKBONE_MODULES for n in report.not_in_file)


# ---------------------------------------------------------------- strict checkpoint loading

def test_load_state_strict(tmp_path):
    torch.manual_seed(0)
    v2 = build_model("2", 3, "imagenet", 18)
    target = build_model("2", 3, "imagenet", 18)
    load_state_strict(target, {"module." + k: v for k, v in v2.state_dict().items()}, "ddp.pth")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), v2.state_dict().values()))

    v3 = build_model("3", 3, "imagenet", 18)
    with pytest.raises(UserError) as err:
        load_state_strict(v3, v2.state_dict(), "runs/x/best_model.pth")
    msg = str(err.value)
    assert "runs/x/best_model.pth" in msg and "another model" in msg
    n_aspp = sum(k.startswith(("aspp.", "decoder.")) for k in v3.state_dict())
    assert f"missing in the file ({n_aspp})" in msg and "unexpected in the file (8)" in msg
    assert "layer5.conv2d_list.0.weight" in msg and "more" in msg

    other = build_model("2", 5, "imagenet", 18)
    with pytest.raises(UserError) as err:
        load_state_strict(other, v2.state_dict(), "c.pth")
    msg = str(err.value)
    # layer5's 4 weights + 4 biases have 3 instead of 5 classes; selectors 3 and 4 (feature and memory,
    # 9 tensors each) are absent from the file; nothing is unexpected
    assert "shape mismatch (8)" in msg and "missing in the file (36)" in msg and "unexpected" not in msg
    assert "layer5.conv2d_list.0.weight (file (3, 512, 3, 3), model (5, 512, 3, 3))" in msg
    assert "contrastive_class_selector_3.0.weight" in msg
