"""DeepLabv3+ (SPEC 3): torchvision-style ResNet at output stride 16, ASPP and a decoder at stride 4.

Submodule names are the released model's (model/deeplabv3.py of the release): `aspp.aspp1..aspp4.{atrous_conv,bn}`,
`aspp.global_avg_pool.{1,2}`, `aspp.conv1`, `aspp.bn1`, `decoder.conv1`, `decoder.bn1`,
`decoder.pre_last_conv.{0,1,3,4}`, `decoder.last_conv` (the only conv with a bias). The contrastive features are
the decoder's 256-channel maps before the last dropout and 1x1 classifier; logits and features are both at
stride 4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.heads import SegmentationModel
from model.resnet import ResNetBackbone, same_conv3x3

ASPP_DILATIONS = (6, 12, 18)


class _ASPPModule(nn.Module):
    """conv (1x1 or dilated 3x3) -> BN -> ReLU, 256 channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation
        self.atrous_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                                     bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(same_conv3x3(self.atrous_conv, x)))


class ASPP(nn.Module):
    """1x1 + three dilated 3x3 (6/12/18) + image pooling, 256 ch each; concat 1280 -> 1x1 -> 256, dropout 0.5.

    The image-pooling branch has a BatchNorm on a 1x1 map, so train mode needs a batch of at least 2.
    """

    def __init__(self, in_channels: int, channels: int = 256, dilations: tuple[int, ...] = ASPP_DILATIONS):
        super().__init__()
        self.aspp1 = _ASPPModule(in_channels, channels, 1, 1)
        self.aspp2 = _ASPPModule(in_channels, channels, 3, dilations[0])
        self.aspp3 = _ASPPModule(in_channels, channels, 3, dilations[1])
        self.aspp4 = _ASPPModule(in_channels, channels, 3, dilations[2])
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                                             nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(5 * channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = self.global_avg_pool(x).expand(-1, -1, *size)   # bilinear upsampling of a 1x1 map = broadcast
        x = torch.cat((self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), pooled), dim=1)  # [B,1280,h,w]
        return self.dropout(self.relu(self.bn1(self.conv1(x))))


class Decoder(nn.Module):
    """Low-level features -> 48 (`conv1` 1x1, `bn1`, ReLU); concat with the upsampled ASPP output (304 ch) ->
    `pre_last_conv`: [0] 3x3 conv 304->256, [1] BN, [2] ReLU, [3] 3x3 conv 256->256, [4] BN, [5] ReLU (no dropout
    inside; its output is the contrastive features) -> `last_dropout` Dropout(0.1) -> `last_conv` 1x1 conv to C
    with bias. Names and layout are the released decoder's, so its checkpoints load strictly."""

    def __init__(self, low_level_channels: int, num_classes: int, aspp_channels: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_channels, 48, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(48)
        self.relu = nn.ReLU(inplace=True)
        self.pre_last_conv = nn.Sequential(
            nn.Conv2d(aspp_channels + 48, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True))
        self.last_dropout = nn.Dropout(0.1)
        self.last_conv = nn.Conv2d(256, num_classes, 1)

    def features(self, x: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        """ASPP output [B,256,h16,w16] + low-level [B,L,h4,w4] -> features [B,256,h4,w4]."""
        low_level = self.relu(self.bn1(self.conv1(low_level)))
        x = F.interpolate(x, size=low_level.shape[-2:], mode="bilinear", align_corners=True)
        return self.pre_last_conv(torch.cat((x, low_level), dim=1))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """features [B,256,h4,w4] -> logits [B,C,h4,w4]."""
        return self.last_conv(self.last_dropout(features))


class DeepLabV3Plus(SegmentationModel):
    """DeepLabv3+ on a torchvision-style ResNet (default depth 50; the domain-adaptation script uses 101) at
    output stride 16: layer4 has stride 1 and dilation 2 in every block, the first included, as released.
    A narrower backbone (width < 64) changes only the backbone and the input channels of ASPP and the decoder's
    low-level 1x1 conv; ASPP and decoder keep the released 256 channels.
    """

    decoder_modules = ("aspp", "decoder")

    def __init__(self, num_classes: int, depth: int = 50, width: int = 64):
        backbone = ResNetBackbone(depth, "torchvision", dilate_layer3=1, dilate_layer4=2, width=width)
        super().__init__(backbone, num_classes, feature_channels=256, output_stride=4)
        self.aspp = ASPP(backbone.out_channels)
        self.decoder = Decoder(backbone.low_level_channels, num_classes)
        self._finish()

    def forward(self, x: torch.Tensor, return_features: bool = False):
        low, high = self.backbone(x)                                   # [B,L,H/4,W/4], [B,F,H/16,W/16]
        features = self.decoder.features(self.aspp(high), low)        # [B,256,H/4,W/4]
        logits = self.decoder.classify(features)                       # [B,C,H/4,W/4]
        return (logits, features) if return_features else logits
