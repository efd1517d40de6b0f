"""Weighted linear surrogates in torch, computed as scikit-learn computes them: the fits behind Lime and KernelShap.

Captum 0.9.0 fits its surrogates with scikit-learn (`SkLearnLasso(alpha=0.01)` for
Lime, `SkLearnLinearRegression()` for KernelShap). The engine never imports
scikit-learn; these functions reproduce the two estimators with
`fit_intercept=True` and a `sample_weight`:

- `lasso` is `sklearn.linear_model.Lasso(alpha, tol, max_iter).fit(x, y, sample_weight)`
  (scikit-learn 1.9): minimise 1/(2 Σw)·Σ wᵢ(yᵢ − xᵢ·coef − b)² + α‖coef‖₁ by
  *its* cyclic coordinate descent, with its gap-safe screening and its stopping
  rule (duality gap ≤ tol·‖ỹ‖²), run in float64.
  NOTE: we stop where scikit-learn stops, on purpose. Its tol=1e-4 rule often
  stops at w = 0 (before the first sweep) where the exact optimum holds a
  coefficient of ~1e-4; a solver that converged tighter would differ from
  Captum by that much. Matching the iterate, we agree to ~1e-7 (float32
  rounding of scikit-learn's own arithmetic) except where a stopping test is
  within rounding of its threshold. Pass a smaller `tol` for the optimum itself.
- `weighted_least_squares` is `sklearn.linear_model.LinearRegression().fit(x, y, sample_weight)`:
  weighted centring, rows times √w, then LAPACK gelsd (SVD, minimum-norm
  solution, singular values under rcond·σ_max dropped — scikit-learn passes its
  `tol=1e-6` as that cutoff), in the dtype of `x` like scikit-learn.
  NOTE: KernelShap's endpoint weights (10⁶ against 1) make the weighted design
  ill-conditioned; in float32 — what Captum hands scikit-learn — gelsd's
  rounding moves the coefficients by up to ~1e-4 from the exact solution once
  n_samples > n_features. The same float32 gelsd reproduces scikit-learn's
  answer to ~1e-6 (8e-6 at worst seen), a float64 solve only to ~1e-4, so
  float32 data are solved in float32.

Both run on the CPU whatever the input's device: the problems are small
(n_samples × n_features), coordinate descent is a sequential loop of scalar
steps, and torch has gelsd only on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from attrserve_engine.errors import DeadlineExceeded

# scikit-learn's defaults.
LASSO_TOL = 1e-4
LASSO_MAX_ITER = 1000
LSTSQ_RCOND = 1e-6  # LinearRegression(tol=1e-6) is passed to scipy.linalg.lstsq as `cond`


@dataclass
class LinearFit:
    coef: Tensor  # (..., n_features)
    intercept: Tensor  # (...)
    n_iter: int = 0  # coordinate descent sweeps (Lasso)
    dual_gap: float = 0.0  # final duality gap (Lasso)


def lasso(
    x: Tensor,
    y: Tensor,
    sample_weight: Tensor | None = None,
    alpha: float = 1.0,
    *,
    tol: float = LASSO_TOL,
    max_iter: int = LASSO_MAX_ITER,
    deadline: float | None = None,
) -> LinearFit:
    """sklearn `Lasso(alpha, tol=tol, max_iter=max_iter).fit(x, y, sample_weight)`; x (S, F), y (S,), weights (S,).

    Returns float64 coefficients (F,) and intercept (). Raises DeadlineExceeded once `deadline` (time.monotonic())
    passes between sweeps: a fit over thousands of features can take seconds, and nobody waits for it then.
    """
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.float64)
    n_samples = x.shape[0]
    sw = None
    if sample_weight is not None:
        sw = sample_weight.detach().to("cpu", torch.float64)
        sw = sw * (n_samples / sw.sum())  # scikit-learn rescales weights to sum to n_samples
    xc, yc, x_offset, y_offset = _centre(x, y, sw)
    coef, gap, n_iter = _coordinate_descent(xc, yc, alpha * n_samples, tol, max_iter, deadline)
    return LinearFit(coef, y_offset - x_offset @ coef, n_iter, gap)


def weighted_least_squares(x: Tensor, y: Tensor, sample_weight: Tensor | None = None, *, rcond: float = LSTSQ_RCOND) -> LinearFit:
    """sklearn `LinearRegression().fit(x, y, sample_weight)`, batched: x (..., S, F), y (..., S), weights (..., S).

    Computed in x's floating dtype (integers as float64), like scikit-learn.
    """
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float64
    x = x.detach().to("cpu", dtype)
    y = y.detach().to("cpu", dtype)
    sw = None if sample_weight is None else sample_weight.detach().to("cpu", dtype)
    xc, yc, x_offset, y_offset = _centre(x, y, sw)
    coef = torch.linalg.lstsq(xc, yc.unsqueeze(-1), rcond=rcond, driver="gelsd").solution.squeeze(-1)  # (..., F)
    return LinearFit(coef, y_offset - (x_offset * coef).sum(-1))


def _centre(x: Tensor, y: Tensor, sw: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's `_preprocess_data(fit_intercept=True)` then `_rescale_data`: weighted centring, rows times √w."""
    if sw is None:
        x_offset, y_offset = x.mean(-2), y.mean(-1)  # (..., F), (...)
        return x - x_offset.unsqueeze(-2), y - y_offset.unsqueeze(-1), x_offset, y_offset
    total = sw.sum(-1, keepdim=True)  # (..., 1)
    x_offset = (x * sw.unsqueeze(-1)).sum(-2) / total  # (..., F)
    y_offset = (y * sw).sum(-1) / total.squeeze(-1)  # (...)
    root = sw.sqrt()
    return (x - x_offset.unsqueeze(-2)) * root.unsqueeze(-1), (y - y_offset.unsqueeze(-1)) * root, x_offset, y_offset


def _coordinate_descent(
    x: Tensor, y: Tensor, alpha: float, tol: float, max_iter: int, deadline: float | None = None
) -> tuple[Tensor, float, int]:
    """scikit-learn's `enet_coordinate_descent` (l1 only, cyclic, gap-safe screening) on centred data.

    Minimises ½‖y − x·w‖² + alpha‖w‖₁ from w = 0. Returns (w, duality gap, sweeps).
    """
    n_features = x.shape[1]
    cols = x.t().contiguous()  # (F, S): each feature's column, contiguous
    col = list(cols.unbind(0))
    norm2 = (cols * cols).sum(1)  # (F,)
    norm2_list = norm2.tolist()
    w = [0.0] * n_features
    r = y.clone()  # residual y − x·w: (S,)
    d_w_tol = tol  # relative size of the largest coordinate step that triggers a gap check
    tol = tol * float(y @ y)  # the gap must fall under tol·‖y‖²
    screening = alpha > 0
    excluded = [False] * n_features

    def gap_and_xtr() -> tuple[float, float, Tensor]:
        """Duality gap (formulation A; for alpha == 0 the first-order condition ‖xᵀr‖²) and xᵀr."""
        xtr = cols @ r  # (F,)
        r_norm2 = float(r @ r)
        if alpha == 0:
            dual_norm = float(xtr @ xtr)
            return dual_norm, dual_norm, xtr
        dual_norm = float(xtr.abs().max()) if n_features else 0.0
        primal = 0.5 * r_norm2 + alpha * sum(abs(v) for v in w)
        scale = alpha / dual_norm if dual_norm > alpha else 1.0
        dual = -0.5 * scale * scale * r_norm2 + scale * float(r @ y)
        return primal - dual, dual_norm, xtr

    def screen(gap: float, dual_norm: float, xtr: Tensor, first: bool) -> list[int]:
        """Gap Safe rules (Fercoq et al.): drop features proven zero at the optimum; returns the active ones in order."""
        theta = (xtr / max(alpha, dual_norm)).abs().tolist()
        bound = (2 * gap) ** 0.5 / alpha
        active = []
        for j in range(n_features):
            if excluded[j]:
                continue
            if first and norm2_list[j] == 0:
                w[j], excluded[j] = 0.0, True
                continue
            if (1 - theta[j]) / norm2_list[j] ** 0.5 <= bound:
                active.append(j)
            else:
                if w[j] != 0:
                    r.add_(col[j], alpha=w[j])
                    w[j] = 0.0
                excluded[j] = True
        return active

    gap, dual_norm, xtr = gap_and_xtr()
    if gap <= tol:
        return torch.tensor(w, dtype=torch.float64), gap, 0
    active = screen(gap, dual_norm, xtr, first=True) if screening else list(range(n_features))

    n_iter = 0
    for n_iter in range(max_iter):
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"the request's deadline passed while fitting Lime's surrogate ({n_features} features, sweep {n_iter})")
        w_max = d_w_max = 0.0
        for j in active:
            n2 = norm2_list[j]
            if n2 == 0.0:
                continue
            w_j = w[j]
            tmp = float(col[j] @ r) + w_j * n2
            new = max(abs(tmp) - alpha, 0.0) / n2
            new = new if tmp >= 0 else -new
            w[j] = new
            if new != w_j:
                r.add_(col[j], alpha=w_j - new)
            d_w_max = max(d_w_max, abs(new - w_j))
            w_max = max(w_max, abs(new))
        if w_max == 0.0 or d_w_max / w_max <= d_w_tol or n_iter == max_iter - 1:
            gap, dual_norm, xtr = gap_and_xtr()
            if gap <= tol:
                break
            if screening:
                active = screen(gap, dual_norm, xtr, first=False)
    return torch.tensor(w, dtype=torch.float64), gap, n_iter + 1
