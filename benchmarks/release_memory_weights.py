#!/usr/bin/env python3
"""The memory-side selector weights of the release's contrastive loss, measured on its arithmetic (docs/fidelity.md).

The release weights each memory entry j of class c by sigmoid(memory selector_c(m̂_j)) "rescaled": the weights
[N, 1] are turned into [1, N] and multiplied by 1 / (their sum over dimension 0), a sum over one element, so each
weight is divided by itself. In exact arithmetic that is 1 with zero gradient; in float32 it is w · (1/w), which
rounds to 1 ± a few 1e-8 and whose autograd (w's two paths: through 1/w and directly) leaves a gradient of rounding
size. This script rebuilds that arithmetic with torch (a plain per-class loop with the release's operations, the
selectors in train mode as the release's training runs them) on random memory and features at the paper's sizes,
and reports:
- the weights' deviation from 1 (largest, and the distinct values that occur);
- the gradient every memory-selector parameter receives (largest and median magnitude, the share of exact zeros);
- the effect of those gradients on the selectors over a paper run: since each selector parameter then has a
  gradient, the release's SGD (momentum 0.9, weight decay 5e-4) applies weight decay and momentum to it at every
  step; simulated over the poly schedule of 150,000 iterations at lr 2e-4 (the paper configs);
- the effect on the rest of training: the relative change of the gradient reaching the features when the weights
  are exactly 1 instead.

    python3 benchmarks/release_memory_weights.py [--classes 19] [--memory 256] [--features 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.heads import class_selector  # noqa: E402  (the released selector architecture)


def release_memory_weight(w_col: torch.Tensor) -> torch.Tensor:
    """[N, 1] sigmoid weights -> [1, N] 'rescaled' weights, as the release computes them: transposed to [1, N],
    then (number of rows, 1) / (sum over the rows) * weights. `int / tensor` was `tensor.reciprocal() * int` in
    torch 1.6, the release's version; written out so here."""
    w = w_col.permute(1, 0)                                                       # [1, N]
    return (w.sum(dim=0).reciprocal() * w.shape[0]) * w


def class_loss(features: torch.Tensor, memory: torch.Tensor, feature_selector, memory_selector,
               exact_ones: bool = False) -> torch.Tensor:
    """One class's term of the release's loss: distances [M, N] weighted by both rescaled weights, their mean."""
    m_hat = F.normalize(memory, dim=1)
    distances = 1 - F.normalize(features, dim=1) @ m_hat.t()                      # [M, N]
    fw = torch.sigmoid(feature_selector(features.detach()))                       # [M, 1]
    fw = (fw.shape[0] / fw.sum(dim=0)) * fw
    distances = distances * fw.repeat(1, distances.shape[1])
    mw = release_memory_weight(torch.sigmoid(memory_selector(m_hat)))             # [1, N]
    if exact_ones:
        mw = torch.ones_like(mw)
    distances = distances * mw.repeat(distances.shape[0], 1)
    return distances.mean(), mw


def poly_sgd_factor(iterations: int, lr: float, power: float, momentum: float, weight_decay: float) -> float:
    """What the release's SGD leaves of a parameter whose own gradient is (nearly) zero: weight decay through
    momentum at every step of a poly schedule (p <- p - lr_t * buf, buf <- momentum * buf + wd * p)."""
    p, buf = 1.0, 0.0
    for i in range(iterations):
        lr_i = lr * (1 - i / iterations) ** power
        buf = momentum * buf + weight_decay * p if i else weight_decay * p
        p -= lr_i * buf
    return p


def measure(classes: int, memory_size: int, features: int, seed: int) -> dict:
    torch.manual_seed(seed)
    feature_selectors = [class_selector().train() for _ in range(classes)]
    memory_selectors = [class_selector().train() for _ in range(classes)]
    memory = torch.randn(classes, memory_size, 256)
    x = torch.randn(features, 256, requires_grad=True)
    labels = torch.randint(0, classes, (features,))
    loss, weights = 0.0, []
    for c in range(classes):
        term, mw = class_loss(x[labels == c], memory[c], feature_selectors[c], memory_selectors[c])
        loss = loss + term
        weights.append(mw.detach().flatten())
    (loss / classes).backward()
    weights = torch.cat(weights)
    deviation = (weights.double() - 1)
    grads = torch.cat([p.grad.flatten() for m in memory_selectors for p in m.parameters()]).abs()
    per_parameter = {}
    for name, _ in memory_selectors[0].named_parameters():
        g = torch.cat([dict(m.named_parameters())[name].grad.flatten() for m in memory_selectors]).abs()
        per_parameter[name] = {"max": float(g.max()), "median": float(g.median()),
                               "zero_share": float((g == 0).double().mean())}
    grad_release = x.grad.clone()

    # the same loss with the memory weights exactly 1 (selectors re-created with the same seed: same values)
    torch.manual_seed(seed)
    feature_selectors = [class_selector().train() for _ in range(classes)]
    memory_selectors = [class_selector().train() for _ in range(classes)]
    x.grad = None
    loss = sum(class_loss(x[labels == c], memory[c], feature_selectors[c], memory_selectors[c], exact_ones=True)[0]
               for c in range(classes))
    (loss / classes).backward()
    relative = float(((x.grad - grad_release).norm() / grad_release.norm()))
    factor = poly_sgd_factor(150000, 2e-4, 0.9, 0.9, 5e-4)
    return {
        "weights": {"count": weights.numel(), "max_abs_deviation_from_1": float(deviation.abs().max()),
                    "distinct_values_minus_1": sorted({float(v) for v in deviation.unique()})},
        "memory_selector_gradients": {"max": float(grads.max()), "median": float(grads.median()),
                                      "zero_share": float((grads == 0).double().mean()),
                                      "every_parameter_nonzero": bool((grads > 0).all()),
                                      "per_parameter": per_parameter},
        "feature_gradient_relative_change_with_exact_ones": relative,
        "sgd_factor_after_a_paper_run": factor,
        "sizes": {"classes": classes, "memory_per_class": memory_size, "features": features, "seed": seed},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--memory", type=int, default=256)
    p.add_argument("--features", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    result = measure(a.classes, a.memory, a.features, a.seed)
    print(json.dumps(result, indent=1))
    f = result["sgd_factor_after_a_paper_run"]
    print(f"\nmemory weights: 1 + {result['weights']['distinct_values_minus_1']} "
          f"(largest deviation {result['weights']['max_abs_deviation_from_1']:.3g})", file=sys.stderr)
    print(f"memory-selector gradients: max {result['memory_selector_gradients']['max']:.3g}, median "
          f"{result['memory_selector_gradients']['median']:.3g}, every parameter nonzero: "
          f"{result['memory_selector_gradients']['every_parameter_nonzero']}", file=sys.stderr)
    print(f"release SGD over a paper run leaves {f:.4f} of each memory-selector weight "
          f"({100 * (1 - f):.1f} % weight decay)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
