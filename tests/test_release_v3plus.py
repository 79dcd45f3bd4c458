"""DeepLabv3+ exactly as released (issue 11, items 2, 3 and 8; SPEC 3 and 9).

The expected structure is written out here from the release's model/deeplabv3.py as read by hand, not taken
from this project's model: the per-block strides and dilations of the backbone, the state-dict keys and shapes
of a released ResNet-50 Cityscapes checkpoint, and a functional (F.conv2d / F.batch_norm) composition of the
released forward. A checkpoint in the release's own layout ({'iteration', 'optimizer', 'config', 'model'},
trainSSL.py's _save_checkpoint) must load strictly into evaluateSSL.py and give the mIoU that the functional
reference gives. The domain-adaptation script builds DeepLabv3+ on ResNet-101 and reads Cityscapes at half
size (its RandomCrop_city / Resize_city), evaluating at full size only in its final evaluations.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import evaluateSSL
from benchmarks.common import cpu_threads
from model import build_model
from model.checkpoint_io import backbone_depth_of
from model.deeplabv3plus import Decoder
from tests.fixtures_data import make_cityscapes_tree, make_gta5_tree
from engine.run import Run
from utils.variants import DOMAIN_ADAPTATION, LESS_MEMORY, TRAIN_SSL, backbone_depth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3_CITY_CONFIG = os.path.join(ROOT, "configs", "configSSL_city_1_30_split0_v3.json")
C = 19
EPS = 1e-5  # BatchNorm eps of torch (1.6 and now)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these small convolutions run several times faster so on the shared 2-core machine."""
    with cpu_threads(1):
        yield

# ------------------------------------------------------------------ the released backbone, block by block
# Released ResNet (model/deeplabv3.py, output_stride 16): bottleneck 1x1 (stride 1) -> 3x3 (stride s, dilation d,
# padding d) -> 1x1; _make_layer passes the layer's dilation to EVERY block and the stride to the first; the
# first block's shortcut is a 1x1 conv with the layer's stride. Layers: (64, stride 1, dil 1), (128, 2, 1),
# (256, 2, 1), (512, 1, 2). Rows: (block, conv1 stride, conv2 stride, conv2 dilation, conv2 padding,
# shortcut stride or None).
RESNET50_BLOCKS = [
    ("layer1.0", 1, 1, 1, 1, 1), ("layer1.1", 1, 1, 1, 1, None), ("layer1.2", 1, 1, 1, 1, None),
    ("layer2.0", 1, 2, 1, 1, 2), ("layer2.1", 1, 1, 1, 1, None), ("layer2.2", 1, 1, 1, 1, None),
    ("layer2.3", 1, 1, 1, 1, None),
    ("layer3.0", 1, 2, 1, 1, 2), ("layer3.1", 1, 1, 1, 1, None), ("layer3.2", 1, 1, 1, 1, None),
    ("layer3.3", 1, 1, 1, 1, None), ("layer3.4", 1, 1, 1, 1, None), ("layer3.5", 1, 1, 1, 1, None),
    ("layer4.0", 1, 1, 2, 2, 1), ("layer4.1", 1, 1, 2, 2, None), ("layer4.2", 1, 1, 2, 2, None),
]


def released_blocks(depth: int) -> list[tuple]:
    """ResNet-50's table; ResNet-101 has 23 layer3 blocks, the extra ones like layer3.1..5."""
    if depth == 50:
        return RESNET50_BLOCKS
    extra = [(f"layer3.{b}", 1, 1, 1, 1, None) for b in range(6, 23)]
    i = [r[0] for r in RESNET50_BLOCKS].index("layer4.0")
    return RESNET50_BLOCKS[:i] + extra + RESNET50_BLOCKS[i:]


def block_geometry(model: nn.Module) -> list[tuple]:
    rows = []
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for b, block in enumerate(getattr(model, layer)):
            ds = None if block.downsample is None else block.downsample[0].stride[0]
            rows.append((f"{layer}.{b}", block.conv1.stride[0], block.conv2.stride[0], block.conv2.dilation[0],
                         block.conv2.padding[0], ds))
    return rows


@pytest.fixture(scope="module")
def v3_meta():
    """DeepLabv3+ ResNet-50 for Cityscapes on the meta device (names and shapes only)."""
    with torch.device("meta"):
        return build_model("3", C, "imagenet", 50, verbose=False)


def test_v3plus_backbone_strides_and_dilations_per_block(v3_meta):
    """ResNet-50 here; the ResNet-101 of domain adaptation is checked in its own test below."""
    model = v3_meta
    assert block_geometry(model) == released_blocks(50)
    assert model.maxpool.ceil_mode is False and model.conv1.stride == (2, 2)
    # output stride 16 at layer4, 4 at the logits: 64 x 96 -> layer1 16 x 24 -> layer4 4 x 6
    low, high = model.backbone(torch.zeros(2, 3, 64, 96, device="meta"))
    assert tuple(low.shape[-2:]) == (16, 24) and tuple(high.shape[-2:]) == (4, 6)


# ------------------------------------------------------------------ the released state dict, written out
def _bn(prefix: str, n: int) -> dict:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,), f"{prefix}.running_mean": (n,),
            f"{prefix}.running_var": (n,), f"{prefix}.num_batches_tracked": ()}


def _linear(prefix: str, n_in: int, n_out: int) -> dict:
    return {f"{prefix}.weight": (n_out, n_in), f"{prefix}.bias": (n_out,)}


def released_v3plus_keys(num_classes: int, depth: int = 50) -> dict[str, tuple]:
    """Every state-dict key of the release's DeepLabv3+ (model/deeplabv3.py) with its shape."""
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    for layer, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"layer{layer}.{b}"
            cin = inplanes if b == 0 else planes * 4
            keys.update({f"{p}.conv1.weight": (planes, cin, 1, 1), **_bn(f"{p}.bn1", planes),
                         f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes),
                         f"{p}.conv3.weight": (planes * 4, planes, 1, 1), **_bn(f"{p}.bn3", planes * 4)})
            if b == 0:
                keys.update({f"{p}.downsample.0.weight": (planes * 4, inplanes, 1, 1),
                             **_bn(f"{p}.downsample.1", planes * 4)})
        inplanes = planes * 4
    # ASPP: no conv bias anywhere
    for k, kernel in ((1, 1), (2, 3), (3, 3), (4, 3)):
        keys.update({f"aspp.aspp{k}.atrous_conv.weight": (256, 2048, kernel, kernel), **_bn(f"aspp.aspp{k}.bn", 256)})
    keys.update({"aspp.global_avg_pool.1.weight": (256, 2048, 1, 1), **_bn("aspp.global_avg_pool.2", 256),
                 "aspp.conv1.weight": (256, 1280, 1, 1), **_bn("aspp.bn1", 256)})
    # decoder: only last_conv has a bias
    keys.update({"decoder.conv1.weight": (48, 256, 1, 1), **_bn("decoder.bn1", 48),
                 "decoder.pre_last_conv.0.weight": (256, 304, 3, 3), **_bn("decoder.pre_last_conv.1", 256),
                 "decoder.pre_last_conv.3.weight": (256, 256, 3, 3), **_bn("decoder.pre_last_conv.4", 256),
                 "decoder.last_conv.weight": (num_classes, 256, 1, 1), "decoder.last_conv.bias": (num_classes,)})
    for head in ("projection_head", "prediction_head"):
        keys.update({**_linear(f"{head}.0", 256, 256), **_bn(f"{head}.1", 256), **_linear(f"{head}.3", 256, 256)})
    for c in range(num_classes):
        for name in (f"contrastive_class_selector_{c}", f"contrastive_class_selector_memory{c}"):
            keys.update({**_linear(f"{name}.0", 256, 256), **_bn(f"{name}.1", 256), **_linear(f"{name}.3", 256, 1)})
    return keys


def _conv_before(bn: str) -> str:
    """The conv whose output a BatchNorm2d normalises, by the release's names (bn2 <- conv2, downsample.1 <-
    downsample.0, aspp2.bn <- aspp2.atrous_conv, pre_last_conv.4 <- pre_last_conv.3, ...)."""
    head, last = bn.rsplit(".", 1) if "." in bn else ("", bn)
    if last.isdigit():
        conv = f"{head}.{int(last) - 1}"
    elif last == "bn":
        conv = f"{head}.atrous_conv"
    else:
        conv = (f"{head}." if head else "") + last.replace("bn", "conv")
    return conv + ".weight"


def released_state(keys: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights whose activations stay of order 1, so that predictions vary from pixel to pixel: weights
    N(0, 1) (views into one shared random pool: quick to draw, and saved once), each BatchNorm's running
    variance about half its conv's fan-in (He scaling done by the BatchNorm), the residual branches' last
    BatchNorm scaled down."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(5_000_000, generator=g)
    state = {}
    for name, shape in keys.items():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000)
        elif name.endswith("running_var"):
            conv = _conv_before(prefix)
            fan_in = math.prod(keys[conv][1:]) if conv in keys else 1  # BatchNorm1d of the heads: unused here
            state[name] = fan_in * (0.25 + 0.5 * torch.rand(shape, generator=g))
        elif name.endswith(("running_mean", ".bias")):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BatchNorm weight
            scale = 0.2 if ".bn3" in name else 1.0
            state[name] = scale * (0.5 + 0.5 * torch.rand(shape, generator=g))
        else:
            n = math.prod(shape)
            start = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
            state[name] = pool[start:start + n].view(shape)
    return state


def test_v3plus_state_dict_is_the_released_one(v3_meta):
    ours = {k: tuple(v.shape) for k, v in v3_meta.state_dict().items()}
    expected = released_v3plus_keys(C)
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert ours == expected


# ------------------------------------------------------------------ the released forward, composed by hand
def _bn_eval(x, s, p):
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"],
                        training=False, eps=EPS)


def _conv_bn_relu(x, s, conv, bn, **kw):
    return F.relu(_bn_eval(F.conv2d(x, s[conv], **kw), s, bn))


def released_decoder(s: dict, aspp_out: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's Decoder.forward in eval mode: (logits, features)."""
    low = _conv_bn_relu(low, s, "decoder.conv1.weight", "decoder.bn1")
    x = F.interpolate(aspp_out, size=low.shape[-2:], mode="bilinear", align_corners=True)
    x = torch.cat((x, low), dim=1)
    x = _conv_bn_relu(x, s, "decoder.pre_last_conv.0.weight", "decoder.pre_last_conv.1", padding=1)
    features = _conv_bn_relu(x, s, "decoder.pre_last_conv.3.weight", "decoder.pre_last_conv.4", padding=1)
    logits = F.conv2d(features, s["decoder.last_conv.weight"], s["decoder.last_conv.bias"])  # dropout: identity
    return logits, features


def released_forward(s: dict, x: torch.Tensor, depth: int = 50) -> torch.Tensor:
    """The release's ResNet (output stride 16) + ASPP + Decoder forward in eval mode -> logits at stride 4."""
    x = _conv_bn_relu(x, s, "conv1.weight", "bn1", stride=2, padding=3)
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    low = None
    for name, s1, s2, d, pad, ds in released_blocks(depth):
        out = _conv_bn_relu(x, s, f"{name}.conv1.weight", f"{name}.bn1", stride=s1)
        out = _conv_bn_relu(out, s, f"{name}.conv2.weight", f"{name}.bn2", stride=s2, dilation=d, padding=pad)
        out = _bn_eval(F.conv2d(out, s[f"{name}.conv3.weight"]), s, f"{name}.bn3")
        short = x if ds is None else _bn_eval(F.conv2d(x, s[f"{name}.downsample.0.weight"], stride=ds), s,
                                              f"{name}.downsample.1")
        x = F.relu(out + short)
        if name == "layer1.2":
            low = x
    branches = [_conv_bn_relu(x, s, "aspp.aspp1.atrous_conv.weight", "aspp.aspp1.bn")]
    for k, d in ((2, 6), (3, 12), (4, 18)):
        branches.append(_conv_bn_relu(x, s, f"aspp.aspp{k}.atrous_conv.weight", f"aspp.aspp{k}.bn", dilation=d,
                                      padding=d))
    pooled = _conv_bn_relu(F.adaptive_avg_pool2d(x, 1), s, "aspp.global_avg_pool.1.weight", "aspp.global_avg_pool.2")
    branches.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True))
    aspp = _conv_bn_relu(torch.cat(branches, dim=1), s, "aspp.conv1.weight", "aspp.bn1")  # dropout: identity
    return released_decoder(s, aspp, low)[0]


def test_v3plus_decoder_eval_equals_hand_composition():
    torch.manual_seed(0)
    dec = Decoder(256, 5)
    s = released_state({"decoder." + k: tuple(v.shape) for k, v in dec.state_dict().items()}, seed=3)
    dec.load_state_dict({k[len("decoder."):]: v for k, v in s.items()}, strict=True)
    dec.eval()
    aspp_out, low = torch.randn(2, 256, 5, 7), torch.randn(2, 256, 17, 25)
    with torch.no_grad():
        features = dec.features(aspp_out, low)
        logits = dec.classify(features)
        want_logits, want_features = released_decoder(s, aspp_out, low)
    assert features.shape == (2, 256, 17, 25) and logits.shape == (2, 5, 17, 25)
    torch.testing.assert_close(features, want_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    # train mode: no dropout before the features (two passes agree), Dropout(0.1) between features and logits
    dec.train()
    torch.manual_seed(1)
    f1 = dec.features(aspp_out, low)
    l1 = dec.classify(f1)
    torch.manual_seed(2)
    f2 = dec.features(aspp_out, low)
    l2 = dec.classify(f2)
    assert torch.equal(f1, f2) and not torch.equal(l1, l2)
    assert isinstance(dec.last_dropout, nn.Dropout) and dec.last_dropout.p == 0.1


# ------------------------------------------------------------------ a released checkpoint in evaluateSSL.py
def _train_id(raw: np.ndarray) -> np.ndarray:
    """Official Cityscapes label id -> train id for the ids the fixture writes; the rest -> 250 (ignored)."""
    table = {7: 0, 8: 1, 11: 2, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13}
    out = np.full(raw.shape, 250, np.int64)
    for label_id, train_id in table.items():
        out[raw == label_id] = train_id
    return out


def _miou(pred: np.ndarray, gt: np.ndarray, n: int) -> float:
    keep = gt < n
    cm = np.bincount(gt[keep] * n + pred[keep], minlength=n * n).reshape(n, n)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = union > 0
    return float(np.mean(np.diag(cm)[present] / union[present]))


def test_released_v3plus_checkpoint_evaluates(tmp_path):
    city = str(tmp_path / "CityScapes")
    files = make_cityscapes_tree(city, n_train=1, n_val=2, size=(48, 64), seed=4)
    state = released_state(released_v3plus_keys(C), seed=1)
    config = json.load(open(V3_CITY_CONFIG))  # the release's config file, as it stored it
    n_trainable = sum(1 for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    optimizer = {"state": {}, "param_groups": [{"lr": 4e-4, "momentum": 0.9, "dampening": 0, "weight_decay": 5e-4,
                                                "nesterov": False, "params": list(range(n_trainable))}]}
    path = str(tmp_path / "best_model.pth")
    torch.save({"iteration": 1000, "optimizer": optimizer, "config": config, "model": state}, path)

    report = evaluateSSL.main(["--model-path", path, "--data-root", city, "--device", "cpu"])

    # the functional reference of the release's network on the same images (full size for v3, as released)
    mean = torch.tensor((73.15835921, 82.90891754, 72.39239876)).view(1, 3, 1, 1)  # RGB, imagenet pretraining
    preds, gts = [], []
    for image_path, label_path in files["val"]:
        img = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            logits = released_forward(state, (img - mean) / 255.0)
        gt = _train_id(np.asarray(Image.open(label_path)))
        up = F.interpolate(logits, size=gt.shape, mode="bilinear", align_corners=True)
        preds.append(up.argmax(1)[0].numpy().ravel())
        gts.append(gt.ravel())
    pred, gt = np.concatenate(preds), np.concatenate(gts)
    assert len(np.unique(pred)) >= 3  # the weights give varied predictions, so the mIoU tells networks apart
    assert report["miou"] == pytest.approx(_miou(pred, gt, C), abs=1e-12)


# ------------------------------------------------------------------ the domain-adaptation script with a v3 config
@pytest.fixture(scope="module")
def city_gta5(tmp_path_factory):
    city = str(tmp_path_factory.mktemp("CityScapes"))
    files = make_cityscapes_tree(city, n_train=6, n_val=1, size=(64, 96), seed=5)
    gta5 = str(tmp_path_factory.mktemp("GTA5"))
    make_gta5_tree(gta5, n_train=4, n_val=1, size=(64, 96), seed=6)
    return city, gta5, files


def dry_run(variant, city_gta5, tmp_path, capsys) -> tuple[Run, str]:
    city, gta5, _ = city_gta5
    sets = {"training.data.input_size": "32,48", "training.data.labeled_samples": 4, "training.batch_size": 4,
            "training.data.split_id_list": 7, "training.num_workers": 0,  # a random split of the tiny tree
            "utils.checkpoint_dir": str(tmp_path / "run"), "utils.tensorboard": False, "utils.curves": False}
    argv = ["--config", V3_CITY_CONFIG, "--data-root", city, "--device", "cpu", "--dry-run"]
    if variant.uses_gta5:  # a flag of the domain-adaptation script only
        argv += ["--gta5-root", gta5]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    run = Run(variant, argv)
    return run, capsys.readouterr().out


def test_domain_adaptation_v3_is_resnet101_at_half_size(city_gta5, tmp_path, capsys):
    _, _, files = city_gta5
    run, out = dry_run(DOMAIN_ADAPTATION, city_gta5, tmp_path, capsys)
    assert run.student.depth == 101 and len(run.student.layer3) == 23
    assert block_geometry(run.student) == released_blocks(101)
    assert "DeepLabv3+ ResNet-101" in out and "of half-size images" in out
    image_path, label_path = files["train"][0]
    # a 32 x 48 crop of the 32 x 48 half-size image is that whole image: Pillow bilinear resize, as released
    half = np.asarray(Image.open(image_path).convert("RGB").resize((48, 32), Image.BILINEAR), np.float32)
    img, _, _ = run.data.train[(0, 123)]
    assert torch.equal(img, torch.from_numpy(half).permute(2, 0, 1))
    # periodic evaluation: half-size image, full-size label; the final evaluations: full size
    assert run.val_set is run.data.val
    val_img, val_lbl, _ = run.data.val[0]
    assert tuple(val_img.shape) == (3, 32, 48) and tuple(val_lbl.shape) == (64, 96)
    final_img, final_lbl, _ = run.final_val_set[0]
    assert tuple(final_img.shape) == (3, 64, 96) and tuple(final_lbl.shape) == (64, 96)


def test_trainssl_v3_stays_resnet50_at_full_size(city_gta5, tmp_path, capsys):
    _, _, files = city_gta5
    run, out = dry_run(TRAIN_SSL, city_gta5, tmp_path, capsys)
    assert run.student.depth == 50 and "DeepLabv3+ ResNet-50" in out and "half-size" not in out
    full = np.asarray(Image.open(files["train"][0][0]).convert("RGB"), np.float32)
    img, _, _ = run.data.train[(0, 123)]
    assert tuple(img.shape) == (3, 32, 48)
    crops = [full[y:y + 32, x:x + 48] for y in range(33) for x in range(49)]  # a crop of the full-size image
    assert any(np.array_equal(img.permute(1, 2, 0).numpy(), c) for c in crops)
    assert tuple(run.data.val[0][0].shape) == (3, 64, 96) and run.final_val_set is run.data.val


def test_backbone_depth_read_from_released_weights():
    """evaluateSSL.py takes the depth from the weights when the config leaves it null: the release's
    domain-adaptation script saved ResNet-101 DeepLabv3+ weights with the same config as trainSSL.py's ResNet-50."""
    assert backbone_depth_of(dict.fromkeys(released_v3plus_keys(C, 50))) == 50
    assert backbone_depth_of(dict.fromkeys(released_v3plus_keys(C, 101))) == 101
    assert backbone_depth_of({"module." + k: None for k in released_v3plus_keys(C, 101)}) == 101
    assert backbone_depth_of({"conv1.weight": None}) is None


def test_script_table_v3_depth_and_resolution():
    """Release: trainSSL.py and trainSSL_less_memory.py build Res_Deeplab50 and crop v3 Cityscapes at full size
    (RandomCrop_city_highres); the domain-adaptation script builds Res_Deeplab (101) and crops at half size."""
    def cfg(version, depth=None):
        return {"version": version, "backbone": {"depth": depth}}
    rows = [(v.name, backbone_depth(cfg("3"), v), backbone_depth(cfg("2"), v), backbone_depth(cfg("3", 18), v),
             v.cityscapes_half_size) for v in (TRAIN_SSL, LESS_MEMORY, DOMAIN_ADAPTATION)]
    assert rows == [("trainSSL", 50, None, 18, False), ("trainSSL_less_memory", 50, None, 18, False),
                    ("trainSSL_domain_adaptation_targetCity", 101, None, 18, True)]
