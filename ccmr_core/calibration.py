"""Temperature scaling (Guo et al. 2017), fitted on validation patients after training.

The fit needs only the validation negative log-likelihood at a fixed grid of temperatures: a sum
over patients, so each site of a federation can report it as a fixed-size statistic and the
coordinator fits the temperature from the pooled sums without seeing a patient's output. Central
training uses the very same code on its own validation patients.
"""

from __future__ import annotations

import numpy as np

TEMPERATURES = np.geomspace(0.25, 8.0, 41)  # ratio ~1.09 between neighbours; refined by a parabola


def nll_sums(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Summed NLL of the labels at every temperature of the grid, (len(TEMPERATURES),)."""
    if len(labels) == 0:
        return np.zeros(len(TEMPERATURES))
    z = logits[None, :, :] / TEMPERATURES[:, None, None]  # (K, N, C)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[:, np.arange(len(labels)), labels].sum(-1)


def fit_temperature(sums: np.ndarray) -> float:
    """The temperature minimising the pooled NLL: the best grid point, refined by a parabola
    through it and its neighbours in log-temperature; 1.0 when there is nothing to fit."""
    sums = np.asarray(sums, dtype=float)
    if not np.isfinite(sums).all() or sums.max() <= 0:
        return 1.0
    k = int(np.argmin(sums))
    logt = np.log(TEMPERATURES)
    if 0 < k < len(sums) - 1:
        y0, y1, y2 = sums[k - 1 : k + 2]
        denom = y0 - 2 * y1 + y2
        if denom > 0:
            step = logt[1] - logt[0]
            return float(np.exp(logt[k] + 0.5 * step * (y0 - y2) / denom))
    return float(TEMPERATURES[k])
