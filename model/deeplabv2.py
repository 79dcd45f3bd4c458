"""DeepLabv2 (SPEC 3): dilated ResNet (output stride 8) + the four-branch atrous classifier `layer5`.

Contrastive features are the layer4 output (2048 channels for depth 50/101, 512 for 18/34; times width/64 for a
narrower backbone).
"""
from __future__ import annotations

import torch
from torch import nn

from model.heads import SegmentationModel
from model.resnet import ResNetBackbone

DILATIONS = (6, 12, 18, 24)


class Classifier_Module(nn.Module):  # noqa: N801 - the released class name
    """Four 3x3 convs F -> C with dilation = padding = 6, 12, 18, 24 (bias, weights N(0, 0.01)); their
    outputs are summed. `branches` = how many are summed: 2 reproduces the released forward, which returned
    inside its loop after adding the second branch (fidelity "code"); 4 is the paper (fidelity "paper").
    All four convs exist either way, so checkpoints are the same."""

    def __init__(self, in_channels: int, num_classes: int, branches: int = 2,
                 dilations: tuple[int, ...] = DILATIONS):
        super().__init__()
        self.branches = branches
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for m in self.conv2d_list:
            nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:self.branches]:
            out = out + conv(x)
        return out


class DeepLabV2(SegmentationModel):
    """DeepLabv2: variant "coco" (AdvSemiSeg's COCO ResNet) or "torchvision" (ImageNet weights)."""

    decoder_modules = ("layer5",)

    def __init__(self, num_classes: int, depth: int = 101, variant: str = "coco", branches: int = 2,
                 width: int = 64):
        backbone = ResNetBackbone(depth, variant, dilate_layer3=2, dilate_layer4=4, width=width)
        super().__init__(backbone, num_classes, backbone.out_channels, backbone.output_stride)
        self.layer5 = Classifier_Module(backbone.out_channels, num_classes, branches)
        self._finish()

    def forward(self, x: torch.Tensor, return_features: bool = False):
        _, features = self.backbone(x)          # [B,F,h,w], h = H/8 (rounded as the convs round)
        logits = self.layer5(features)          # [B,C,h,w]
        return (logits, features) if return_features else logits
