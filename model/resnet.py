"""ResNet backbones for DeepLabv2 and DeepLabv3+ (SPEC 3).

Two variants share parameter names (conv1, bn1, layer1..layer4 with `.N.conv1/bn1/conv2/bn2/conv3/bn3/
downsample.0/downsample.1`) so released checkpoints and torchvision weights load by name:
- "coco": the Caffe-style ResNet of AdvSemiSeg's Res_Deeplab (the COCO-pretrained DeepLabv2): a bottleneck
  puts its stride on the first 1x1 conv, the max-pool uses ceil_mode, and every layer's first block has a
  projection shortcut.
- "torchvision": torchvision's ResNet (stride on the 3x3 conv, no ceil_mode, a projection shortcut only where
  the shape changes), so ImageNet weights load unchanged.
All BatchNorm2d layers have frozen affine parameters (requires_grad False) but stay in train mode with the
rest of the model, i.e. they normalise with batch statistics during training, as released.

`width` is the base width W of the stem and layer1 (layer2..4: 2W, 4W, 8W planes, times the block expansion).
W = 64 is the standard ResNet, the one every released and pretrained network has; a narrower one (e.g. 32) is
for CPU-sized experiments from random initialisation. Tensor names do not depend on W.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
VARIANTS = ("coco", "torchvision")
STANDARD_WIDTH = 64  # the base width of the standard (released, pretrained) ResNets


def _conv3x3(inplanes: int, planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def same_conv3x3(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a 3x3 conv with padding = dilation d, computed without the kernel rows (columns) that read
    only zero padding: when d >= the map's height (width), the outer taps of every output pixel fall outside the
    map, so the conv equals one with the centre row (column) of the kernel and no padding there. Same output and
    same gradients (the outer taps get zero gradient either way), up to float summation order.

    Small maps meet large dilations at small crops: DeepLabv3+'s ASPP (dilation 6/12/18) on a 2x3 layer4 map
    is then a 1x1 conv computed at 9x its cost, and layer4 (dilation 2) on a 2-pixel-high map a 1x3 conv.
    Convs of another shape (kernel, stride, groups, padding) are called as they are.
    """
    d = conv.dilation[0]
    if (conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.groups != 1 or conv.dilation != (d, d)
            or conv.padding != (d, d)):
        return conv(x)
    h, w = x.shape[-2:]
    rows, cols = d >= h, d >= w
    if not (rows or cols):
        return conv(x)
    centre, whole = slice(1, 2), slice(0, 3)
    weight = conv.weight[:, :, centre if rows else whole, centre if cols else whole]
    return F.conv2d(x, weight, conv.bias, 1, (0 if rows else d, 0 if cols else d), (d, d))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the stride sits on the first in both variants."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, variant: str = "coco"):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(same_conv3x3(self.conv1, x)))
        out = self.bn2(same_conv3x3(self.conv2, out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (dilated) -> 1x1 (ResNet-50/101). Stride on conv1 ("coco") or on conv2 ("torchvision")."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, variant: str = "coco"):
        super().__init__()
        s1, s2 = (stride, 1) if variant == "coco" else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, s2, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(same_conv3x3(self.conv2, out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBackbone(nn.Module):
    """ResNet without avg-pool/fc; forward returns (layer1 output, layer4 output).

    dilate_layer3 / dilate_layer4: dilation (and padding) of the 3x3 convs of EVERY block of that layer, the
    first included, as in both released networks (DeepLabv2's Res_Deeplab and DeepLabv3+'s ResNet); a value > 1
    also replaces the layer's stride 2 by 1 (DeepLabv2: 2 and 4 -> output stride 8; DeepLabv3+: 1 and 2 ->
    output stride 16). torchvision's `replace_stride_with_dilation` differs: there a layer's first block keeps
    the previous layer's dilation. Dilation changes no parameter shape.
    """

    def __init__(self, depth: int = 101, variant: str = "coco", dilate_layer3: int = 1, dilate_layer4: int = 1,
                 width: int = STANDARD_WIDTH):
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"ResNet depth {depth}; choose one of {sorted(LAYERS)}")
        if variant not in VARIANTS:
            raise ValueError(f"ResNet variant {variant!r}; choose one of {VARIANTS}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"ResNet width {width!r}; give a positive integer (64: the standard ResNet)")
        self.depth, self.variant, self.width = depth, variant, width
        block = BasicBlock if depth < 50 else Bottleneck
        self._block, self._inplanes = block, width

        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=variant == "coco")
        n = LAYERS[depth]
        self.layer1 = self._make_layer(width, n[0], 1, 1)
        self.layer2 = self._make_layer(2 * width, n[1], 2, 1)
        self.layer3 = self._make_layer(4 * width, n[2], 2, dilate_layer3)
        self.layer4 = self._make_layer(8 * width, n[3], 2, dilate_layer4)

        self.low_level_channels = width * block.expansion      # layer1 output (64 or 256 at the standard width)
        self.out_channels = 8 * width * block.expansion        # layer4 output (512 or 2048 at the standard width)
        self.output_stride = 4 * 2 * (2 if dilate_layer3 == 1 else 1) * (2 if dilate_layer4 == 1 else 1)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def _make_layer(self, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        block, variant = self._block, self.variant
        if dilation > 1:
            stride = 1
        out = planes * block.expansion
        downsample = None
        if variant == "coco" or stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self._inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        layers = [block(self._inplanes, planes, stride, dilation, downsample, variant)]
        self._inplanes = out
        layers += [block(out, planes, 1, dilation, None, variant) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return run_backbone(self, x)


def run_backbone(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stem + layer1..layer4 of `net` (a ResNetBackbone, or a model that adopted its modules by name).

    x [B,3,H,W] -> (low-level layer1 features [B,L,H/4,W/4], layer4 features [B,F,H/os,W/os]).
    """
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    low = net.layer1(x)
    return low, net.layer4(net.layer3(net.layer2(low)))
