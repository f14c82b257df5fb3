"""Image-similarity figures of a reconstruction: PSNR and SSIM, and the best match within a batch.

SSIM follows Wang, Bovik, Sheikh and Simoncelli 2004, "Image quality assessment: from error
visibility to structural similarity" (IEEE TIP 13(4)): an 11x11 circular-symmetric Gaussian
window of standard deviation 1.5 (normalised to sum 1), ``K1 = 0.01``, ``K2 = 0.03``,
``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` with ``L`` the dynamic range, the SSIM map over the
window positions that lie wholly inside the image ("valid"), and its mean (MSSIM). Colour
images average the channels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = ["psnr", "ssim", "gaussian_window", "best_match"]


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``x`` against the reference ``y`` (``inf`` when equal)."""
    mse = float(torch.mean((x.double() - y.double()) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The ``size x size`` Gaussian window of Wang et al. 2004, summing to 1."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of image ``x`` against ``y``, each ``(C, H, W)`` or ``(H, W)`` (Wang et al. 2004)."""
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    x4 = x.double().reshape(-1, 1, *x.shape[-2:])
    y4 = y.double().reshape(-1, 1, *y.shape[-2:])
    if min(x4.shape[-2:]) < size:
        raise ValueError(f"images smaller than the {size}x{size} window")
    w = gaussian_window(size, sigma)[None, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x4, w), F.conv2d(y4, w)
    sxx = F.conv2d(x4 * x4, w) - mu_x**2
    syy = F.conv2d(y4 * y4, w) - mu_y**2
    sxy = F.conv2d(x4 * y4, w) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float((num / den).mean())


def best_match(reconstructed: torch.Tensor, truth: torch.Tensor, data_range: float = 1.0) -> list[int]:
    """For each true image, the index of the reconstruction assigned to it (highest total PSNR).

    A batch attack returns its images in no particular order; as in Geiping et al. 2020 each
    true image is scored against its best reconstruction, here by an optimal one-to-one
    assignment (Hungarian) when there are at least as many reconstructions as true images.
    """
    scores = np.array([[psnr(r, t, data_range) for r in reconstructed] for t in truth])
    scores = np.nan_to_num(scores, posinf=1e3)
    if len(reconstructed) >= len(truth):
        rows, cols = linear_sum_assignment(-scores)
        order = np.empty(len(truth), dtype=int)
        order[rows] = cols
        return order.tolist()
    return scores.argmax(1).tolist()
