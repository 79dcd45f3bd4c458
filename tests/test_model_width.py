"""backbone.width (a narrower ResNet for CPU-sized experiments) and same_conv3x3 (dilated 3x3 convs on maps smaller
than their dilation): shapes and names by hand, the refusal of pretrained weights, a width-16 checkpoint rebuilt from
its stored config, and outputs and gradients equal to the plain convolution's."""
import os

import pytest
import torch
from torch import nn

import model.deeplabv3plus as deeplabv3plus
import model.resnet as resnet
from model import build_model
from model.resnet import same_conv3x3
from engine.config import load_config
from utils.errors import UserError
from engine.inference import load_trained_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_CONFIG = os.path.join(ROOT, "benchmarks", "configs", "ssl_synthetic.json")


def _meta(*args, **kwargs):
    with torch.device("meta"):
        return build_model(*args, **kwargs)


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- shapes and names

def test_width_32_resnet18_v3plus_shapes_by_hand():
    C = 8
    narrow, standard = _shapes(_meta("3", C, "imagenet", 18, width=32)), _shapes(_meta("3", C, "imagenet", 18))
    assert list(narrow) == list(standard)                      # names (and their order) do not depend on the width
    expected = {
        "conv1.weight": (32, 3, 7, 7), "bn1.running_mean": (32,),
        "layer1.0.conv1.weight": (32, 32, 3, 3), "layer1.1.bn2.weight": (32,),
        "layer2.0.conv1.weight": (64, 32, 3, 3), "layer2.0.downsample.0.weight": (64, 32, 1, 1),
        "layer3.0.conv2.weight": (128, 128, 3, 3), "layer3.0.downsample.1.running_var": (128,),
        "layer4.0.conv1.weight": (256, 128, 3, 3), "layer4.1.conv2.weight": (256, 256, 3, 3),
        # ASPP and decoder keep the released 256 channels; only their inputs follow the backbone
        "aspp.aspp1.atrous_conv.weight": (256, 256, 1, 1), "aspp.aspp4.atrous_conv.weight": (256, 256, 3, 3),
        "aspp.global_avg_pool.1.weight": (256, 256, 1, 1), "aspp.conv1.weight": (256, 1280, 1, 1),
        "decoder.conv1.weight": (48, 32, 1, 1), "decoder.pre_last_conv.0.weight": (256, 304, 3, 3),
        "decoder.last_conv.weight": (C, 256, 1, 1), "projection_head.0.weight": (256, 256),
    }
    for name, shape in expected.items():
        assert narrow[name] == shape, name
    # at width 64 the same tensors have the standard ResNet-18 shapes
    assert standard["layer4.1.conv2.weight"] == (512, 512, 3, 3) and standard["decoder.conv1.weight"] == (48, 64, 1, 1)
    # every changed tensor is a backbone tensor or an input of ASPP / the decoder's low-level conv
    changed = {k for k in narrow if narrow[k] != standard[k]}
    assert all(k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4") or k.startswith(
        ("aspp.aspp", "aspp.global_avg_pool.1", "decoder.conv1")) for k in changed)
    assert "aspp.aspp2.bn.weight" not in changed and "decoder.pre_last_conv.3.weight" not in changed


def test_width_16_bottleneck_and_v2_shapes_by_hand():
    # ResNet-50 at width 16: planes 16/32/64/128, expansion 4 -> layer1 64 channels, layer4 512
    s = _shapes(_meta("3", 5, "imagenet", 50, width=16))
    assert s["layer1.0.conv1.weight"] == (16, 16, 1, 1) and s["layer1.0.conv3.weight"] == (64, 16, 1, 1)
    assert s["layer4.2.conv3.weight"] == (512, 128, 1, 1) and s["decoder.conv1.weight"] == (48, 64, 1, 1)
    assert s["aspp.aspp2.atrous_conv.weight"] == (256, 512, 3, 3)
    # DeepLabv2: the classifier and the projection head read the 8W-channel layer4 output
    v2 = _meta("2", 5, "COCO", 18, width=16)
    assert v2.feature_channels == 128 and _shapes(v2)["layer5.conv2d_list.0.weight"] == (5, 128, 3, 3)
    assert _shapes(v2)["projection_head.0.weight"] == (256, 128)
    assert _shapes(v2)["layer1.0.downsample.0.weight"] == (16, 16, 1, 1)       # coco variant's layer1 shortcut


def test_width_32_forward_shapes_and_parameter_count_by_hand():
    torch.manual_seed(0)
    model = build_model("3", 4, "imagenet", 18, width=32, verbose=False).train()
    logits, feats = model(torch.randn(2, 3, 32, 48), return_features=True)
    assert logits.shape == (2, 4, 8, 12) and feats.shape == (2, 256, 8, 12)
    assert model.width == 32

    def backbone_parameters(net):
        return sum(p.numel() for n, p in net.named_parameters()
                   if n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))

    # ResNet-18 at width w, conv weights: stem 3*49*w; layer1 4 convs 9*w*w = 36w^2; layer2 9*w*2w + 3*9*(2w)^2 +
    # shortcut 2w*w = 128w^2; layer3 512w^2; layer4 2048w^2; BatchNorm weight + bias on 75w channels = 150w.
    # Total 2724w^2 + 297w: 11,176,512 at w = 64 (torchvision's resnet18 without fc: 11,689,512 - 513,000).
    assert backbone_parameters(_meta("3", 4, "imagenet", 18)) == 2724 * 64 ** 2 + 297 * 64 == 11_176_512
    assert backbone_parameters(model) == 2724 * 32 ** 2 + 297 * 32 == 2_798_880


# ---------------------------------------------------------------- the width rule of pretrained weights

def _backbone_file(path, width: int, depth: int = 18, seed: int = 0) -> dict:
    """A weights file holding the backbone tensors (what an ImageNet file holds) of a ResNet of `width`."""
    torch.manual_seed(seed)
    state = {k: v for k, v in build_model("3", 4, "imagenet", depth, width=width, verbose=False).state_dict().items()
             if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")}
    torch.save(state, path)
    return state


def test_only_the_default_weights_need_the_standard_width(tmp_path):
    # "default" (the released ImageNet/COCO files) is refused at another width, by build_model and by the config
    with pytest.raises(UserError) as err:
        build_model("3", 4, "imagenet", 18, "default", width=32)
    msg = str(err.value)
    assert "backbone.width is 32" in msg and '"none"' in msg and '"default"' in msg and '"synthetic"' in msg
    with pytest.raises(UserError) as err:
        load_config(BENCH_CONFIG, ["backbone.width=32", "backbone.pretrained=default"])
    assert "ssl_synthetic.json" in str(err.value) and "backbone.pretrained" in str(err.value)
    # a local file of width 32 loads into a width-32 network: every one of its tensors, bit for bit
    path = str(tmp_path / "w32.pth")
    state = _backbone_file(path, 32)
    model = build_model("3", 4, "imagenet", 18, path, width=32, verbose=False)
    assert model.pretrained_report.loaded == len(state) == 120 and not model.pretrained_report.skipped
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    # ... and the config accepts a file or "synthetic" at any width
    assert load_config(BENCH_CONFIG, [f"backbone.pretrained={path}"])["backbone"]["width"] == 32
    assert load_config(BENCH_CONFIG, ["backbone.pretrained=synthetic", "backbone.width=16"])["backbone"]["width"] == 16
    # a missing file is named as such (not as a width problem)
    with pytest.raises(UserError, match="not found"):
        build_model("3", 4, "imagenet", 18, str(tmp_path / "missing.pth"), width=32)
    assert build_model("3", 4, "imagenet", 18, "none", width=32, verbose=False).pretrained_report is None
    with pytest.raises(UserError, match="positive integer"):
        build_model("3", 4, "imagenet", 18, None, width=0)
    with pytest.raises(UserError, match="at least 1"):
        load_config(BENCH_CONFIG, ["backbone.width=0", "backbone.pretrained=none"])
    assert load_config(BENCH_CONFIG)["backbone"]["width"] == 32                 # the benchmark's network
    paper = os.path.join(ROOT, "configs", "configSSL_city_1_30_split0_imagenet.json")  # no width key: the standard 64
    assert load_config(paper, ["backbone.pretrained=default"])["backbone"]["width"] == 64
    assert load_config(os.path.join(ROOT, "configs", "demo.json"))["backbone"]["width"] == 32  # the demo's network


def test_a_file_whose_backbone_mostly_does_not_fit_is_refused(tmp_path):
    # a width-64 file into a width-32 network: every backbone tensor differs in shape -> refused, nothing loaded
    path = str(tmp_path / "w64.pth")
    _backbone_file(path, 64)
    torch.manual_seed(5)
    with pytest.raises(UserError) as err:
        build_model("3", 4, "imagenet", 18, path, width=32)
    msg = str(err.value)
    # ResNet-18 tensors of conv1/bn1/layer1..4: 120; at width 32 against 64 only the 20 BatchNorm
    # num_batches_tracked scalars keep their shape -> 100 of 120 differ
    assert "100 of the 120 backbone tensors" in msg and "conv1.weight: file (64, 3, 7, 7), model (32, 3, 7, 7)" in msg
    assert "backbone.width" in msg and path in msg
    # a file where only a few tensors differ (here: layer4's first conv) still loads the rest, and says what it skipped
    state = _backbone_file(path, 32)
    state["layer4.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, path)
    report = build_model("3", 4, "imagenet", 18, path, width=32, verbose=False).pretrained_report
    assert report.loaded == 119 and [n for n, _ in report.skipped] == ["layer4.0.conv1.weight"]
    # a deeper file whose common tensors fit (ResNet-34 into -18: layer blocks 2.. are extra) loads them
    _backbone_file(path, 32, depth=34)
    report = build_model("3", 4, "imagenet", 18, path, width=32, verbose=False).pretrained_report
    assert report.loaded == 120 and all(reason == "missing in model" for _, reason in report.skipped)


def test_a_width_16_checkpoint_is_rebuilt_from_its_config(tmp_path):
    """evaluateSSL.py / predict.py build the network from the checkpoint's stored config, width included."""
    cfg = load_config(BENCH_CONFIG, ["backbone.width=16", "backbone.pretrained=none"])
    torch.manual_seed(0)
    net = build_model("3", 8, "imagenet", 18, None, width=16, verbose=False).eval()
    path = str(tmp_path / "best_model.pth")
    torch.save({"model": net.state_dict(), "config": cfg, "iteration": 3}, path)
    trained = load_trained_model(path, torch.device("cpu"))
    assert trained.model.width == 16 and trained.model.conv1.weight.shape == (16, 3, 7, 7)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(trained.model(x), net(x), rtol=0, atol=0)
    # the same weights under a config of the standard width: the strict load names the mismatch
    cfg64 = load_config(BENCH_CONFIG, ["backbone.pretrained=none"])
    torch.save({"model": net.state_dict(), "config": cfg64, "iteration": 3}, path)
    with pytest.raises(UserError, match="shape mismatch"):
        load_trained_model(path, torch.device("cpu"))


# ---------------------------------------------------------------- same_conv3x3

def test_same_conv3x3_hand_worked_case():
    """1 channel, 2x2 map, dilation 2: every outer tap of every output pixel reads padding, so the output is the
    centre weight times the input plus the bias."""
    conv = nn.Conv2d(1, 1, 3, padding=2, dilation=2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 10.0).view(1, 1, 3, 3))    # centre weight 5
        conv.bias.fill_(0.5)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    want = torch.tensor([[[[5.5, 10.5], [15.5, 20.5]]]])
    torch.testing.assert_close(same_conv3x3(conv, x), want, rtol=0, atol=0)
    torch.testing.assert_close(conv(x), want, rtol=0, atol=0)
    # 1x3 map, dilation 1: rows read padding, columns do not -> a 1x3 conv with the middle row (4, 5, 6)
    conv1 = nn.Conv2d(1, 1, 3, padding=1, dilation=1, bias=False)
    with torch.no_grad():
        conv1.weight.copy_(torch.arange(1.0, 10.0).view(1, 1, 3, 3))
    y = same_conv3x3(conv1, torch.tensor([[[[1.0, 2.0, 3.0]]]]))
    # [0*4+1*5+2*6, 1*4+2*5+3*6, 2*4+3*5+0*6]
    torch.testing.assert_close(y, torch.tensor([[[[17.0, 32.0, 23.0]]]]), rtol=0, atol=0)


@pytest.mark.parametrize("dilation,size", [(6, (2, 3)), (18, (2, 3)), (2, (2, 3)), (2, (3, 2)), (2, (3, 3)),
                                           (12, (20, 5)), (1, (1, 4)), (4, (8, 8))])
def test_same_conv3x3_equals_the_convolution_with_gradients(dilation, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=dilation, dilation=dilation, bias=True).double()
    x = torch.randn(2, 5, *size, dtype=torch.double, requires_grad=True)
    want = conv(x)
    upstream = torch.randn_like(want)
    g_want = torch.autograd.grad((want * upstream).sum(), [x, conv.weight, conv.bias])
    got = same_conv3x3(conv, x)
    g_got = torch.autograd.grad((got * upstream).sum(), [x, conv.weight, conv.bias])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_same_conv3x3_leaves_other_convolutions_alone():
    calls = []

    class Spy(nn.Conv2d):
        def forward(self, x):
            calls.append(self)
            return super().forward(x)

    x = torch.randn(1, 2, 2, 2)
    for conv in (Spy(2, 2, 1), Spy(2, 2, 3, padding=1, stride=2), Spy(2, 2, 3, padding=1, dilation=1, groups=2),
                 Spy(2, 2, 3, padding=2, dilation=1)):
        same_conv3x3(conv, x)
    same_conv3x3(Spy(2, 2, 3, padding=0, dilation=2), torch.randn(1, 2, 5, 5))
    same_conv3x3(Spy(2, 2, 3, padding=2, dilation=2), torch.randn(1, 2, 3, 3))     # d < size: plain conv
    assert len(calls) == 6
    same_conv3x3(Spy(2, 2, 3, padding=2, dilation=2), x)      # d >= size: computed from the centre weight
    assert len(calls) == 6


def test_models_compute_as_with_plain_convolutions(monkeypatch):
    """DeepLabv3+ ResNet-18 at a 32x48 crop (layer4 2x3: ASPP and layer4's dilated convs shortened) and
    DeepLabv2 ResNet-50: logits and gradients equal those with every conv called as it is."""
    for version, depth, size in (("3", 18, (32, 48)), ("2", 50, (24, 24))):
        torch.manual_seed(0)
        net = build_model(version, 3, "imagenet", depth, width=8, verbose=False).double().train()
        x = torch.randn(2, 3, *size, dtype=torch.double)

        def run():
            torch.manual_seed(5)                          # the same dropout masks
            net.zero_grad()
            out = net(x)
            (out * torch.linspace(-1, 1, out.numel(), dtype=torch.double).view_as(out)).sum().backward()
            return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

        out, grads = run()
        with monkeypatch.context() as m:
            m.setattr(resnet, "same_conv3x3", lambda conv, x: conv(x))
            m.setattr(deeplabv3plus, "same_conv3x3", lambda conv, x: conv(x))
            ref, ref_grads = run()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        assert len(grads) == len(ref_grads)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
