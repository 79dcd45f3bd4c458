"""Contrastive heads and the model base class shared by DeepLabv2 and DeepLabv3+ (SPEC 3).

The heads work on per-pixel feature vectors [N, F]. They are registered as plain attributes of the model
(`projection_head`, `prediction_head`, `contrastive_class_selector_{c}`, `contrastive_class_selector_memory{c}`)
so state-dict names equal the released model's and its checkpoints load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from model.resnet import ResNetBackbone, run_backbone

HEAD_DIM = 256
BACKBONE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def projection_head(in_features: int, dim: int = HEAD_DIM) -> nn.Sequential:
    """Linear(F, 256), BN1d, ReLU, Linear(256, 256): backbone features -> contrastive space."""
    return nn.Sequential(nn.Linear(in_features, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim))


def prediction_head(dim: int = HEAD_DIM) -> nn.Sequential:
    """Linear(256, 256), BN1d, ReLU, Linear(256, 256): applied on the student side only."""
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


def class_selector(dim: int = HEAD_DIM) -> nn.Sequential:
    """Linear(256, 256), BN1d, LeakyReLU(0.2), Linear(256, 1): a per-class score (pre-sigmoid) of a vector."""
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.LeakyReLU(0.2), nn.Linear(dim, 1))


def init_released(module: nn.Module) -> None:
    """The released final init pass: every Conv2d weight ~ N(0, 0.01) (bias untouched), every BatchNorm2d
    weight 1 and bias 0. Linear / BatchNorm1d keep PyTorch's defaults."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()


class SegmentationModel(nn.Module):
    """Backbone (adopted by name: conv1, bn1, layer1..layer4) + a segmentation decoder + contrastive heads.

    Subclasses add their classifier/decoder, then call `_finish()`. Attributes: num_classes, feature_channels
    (F, channels of the contrastive features), output_stride (stride of the logits and features).
    """

    decoder_modules: tuple[str, ...] = ()   # the classifier / decoder modules, in the release's optimiser order

    def __init__(self, backbone: ResNetBackbone, num_classes: int, feature_channels: int, output_stride: int):
        super().__init__()
        for name in BACKBONE_MODULES + ("relu", "maxpool"):
            self.add_module(name, getattr(backbone, name))
        self.depth, self.variant, self.width = backbone.depth, backbone.variant, backbone.width
        self.num_classes = num_classes
        self.feature_channels = feature_channels
        self.output_stride = output_stride

    def _finish(self) -> None:
        """Add the heads (released order: projection, prediction, C feature selectors, C memory selectors)
        and run the released init pass over the whole model."""
        self.projection_head = projection_head(self.feature_channels)
        self.prediction_head = prediction_head()
        for c in range(self.num_classes):
            setattr(self, f"contrastive_class_selector_{c}", class_selector())
        for c in range(self.num_classes):
            setattr(self, f"contrastive_class_selector_memory{c}", class_selector())
        init_released(self)

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,3,H,W] -> (layer1 features, layer4 features)."""
        return run_backbone(self, x)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits [B,C,h,w] at the output stride, or (logits, features [B,F,h,w]) with return_features."""
        raise NotImplementedError

    def feature_selectors(self) -> list[nn.Module]:
        """The C per-class selectors that score feature vectors (class order)."""
        return [getattr(self, f"contrastive_class_selector_{c}") for c in range(self.num_classes)]

    def memory_selectors(self) -> list[nn.Module]:
        """The C per-class selectors that score memory-bank entries (class order)."""
        return [getattr(self, f"contrastive_class_selector_memory{c}") for c in range(self.num_classes)]

    def optim_parameters(self, lr: float) -> list[dict]:
        """ONE SGD group at `lr` holding every trainable parameter, as released: backbone, classifier/decoder,
        projection and prediction heads, then the selectors class by class (feature c, memory c). The order is
        the release's, so a release checkpoint's optimiser state maps onto the same parameters. Frozen
        (requires_grad False) parameters are left out."""
        modules = [getattr(self, n) for n in BACKBONE_MODULES + self.decoder_modules]
        modules += [self.projection_head, self.prediction_head]
        for c in range(self.num_classes):
            modules += [getattr(self, f"contrastive_class_selector_{c}"),
                        getattr(self, f"contrastive_class_selector_memory{c}")]
        return [{"params": [p for m in modules for p in m.parameters() if p.requires_grad], "lr": lr}]
