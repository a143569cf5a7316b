"""The retrained head: a multinomial logistic regression on a frozen backbone's penultimate
features, warm-started from and anchored to the model's own head (arXiv 2312.05464 retrains
only this head, on a lambda-weighted mix of real and synthetic examples).

Solved with L-BFGS in torch on the features' device (a GPU when there is one, CPU threads
otherwise). At many classes a fit may move only some rows of the head (``active``: the hard
classes and their main confusions) while the rest stay at the model's own weights; the
frozen rows enter the softmax through one per-example constant (their log-sum-exp), so the
restricted problem is solved exactly and costs ``N x D x |active|`` per iteration instead of
``N x D x C``.
"""

from __future__ import annotations

import contextlib

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

_ROWS = 8192  # rows per block when the frozen classes' logits are summed (bounded memory)
# below this many multiply-adds per product a CPU fit runs on one thread: a small product
# takes well under a millisecond, and a second thread costs more than it saves (100x on
# a loaded machine, where threads wait for each other on every product)
_ONE_THREAD_WORK = 2e7


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _one_thread():
    """torch on one intra-op thread for the block (fits on several Python threads share the
    process-wide setting: :func:`audit.zoo.loop.torch_threads`)."""
    from audit.zoo.loop import torch_threads

    return torch_threads(1)


def resolve_device(X, device: str | None = None):
    """The torch device a fit runs on: ``device`` when given (not ``"auto"``), else the
    device of ``X`` when it is a torch tensor, else CUDA when available, else the CPU."""
    import torch

    if device not in (None, "auto"):
        return torch.device(device)
    if isinstance(X, torch.Tensor):
        return X.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _validated(X, y, sample_weight, coef_init, intercept_init, n_classes, active):
    """``(y [N] int64, w [N] summing to 1, W0 [C, D], b0 [C], active [A] sorted)`` as numpy;
    ``X`` is only checked (it may live on a GPU)."""
    y = np.asarray(y.cpu() if hasattr(y, "cpu") else y, np.int64)
    if len(X.shape) != 2 or X.shape[0] != len(y) or len(y) == 0:
        raise ValueError(
            f"X must be [N, D] with N = len(y) > 0; got X {tuple(X.shape)}, y {y.shape}"
        )
    C = int(n_classes or (len(coef_init) if coef_init is not None else y.max() + 1))
    if y.min() < 0 or y.max() >= C:
        raise ValueError(f"labels must be in [0, {C}); got {y.min()}..{y.max()}")
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if w.shape != y.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError("sample_weight must be [N], non-negative, with a positive sum")
    D = int(X.shape[1])
    W0 = np.zeros((C, D)) if coef_init is None else np.asarray(coef_init, np.float64)
    b0 = np.zeros(C) if intercept_init is None else np.asarray(intercept_init, np.float64)
    W0, b0 = W0.reshape(C, D), b0.reshape(C)
    A = np.arange(C) if active is None else np.unique(np.asarray(active, np.int64))
    if len(A) == 0 or A[0] < 0 or A[-1] >= C:
        raise ValueError(f"active must name at least one class in [0, {C}); got {active!r}")
    return y, w / w.sum(), W0, b0, A


class LinearHead(ClassifierMixin, BaseEstimator):
    """A multinomial logistic head on fixed features, warm-started from (and anchored to) the
    model's own head::

        min_{W, b}  sum_i w_i CE(softmax(W x_i + b), y_i) / sum_i w_i  +  alpha/2 ||W - W0||^2

    ``fit(X [N, D], y [N], sample_weight, coef_init [C, D], intercept_init [C], n_classes,
    active, init_logits)``; without an init the anchor is 0 (plain L2). ``active`` (class
    indices, default all) are the rows the fit may move; the others stay at the init, which is
    their optimum of the anchor (``init_logits`` [N, C], ``X`` under the init head, spares the
    product that sums them when the caller has it). Solved with L-BFGS (strong Wolfe line search) in torch on ``device``
    (``None``: ``X``'s device if ``X`` is a tensor, else CUDA when available, else the CPU):
    float32 products, float64 parameters and softmax. ``coef_`` / ``intercept_`` are numpy;
    ``active_`` the rows moved. The anchor keeps what the backbone and head learnt jointly, so
    a small targeted set moves the head only where the data asks it to.
    """

    def __init__(
        self, alpha: float = 1e-3, max_iter: int = 200, tol: float = 1e-7, device: str | None = None
    ):
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def fit(
        self,
        X,
        y,
        sample_weight=None,
        coef_init=None,
        intercept_init=None,
        n_classes: int | None = None,
        active=None,
        init_logits=None,
    ):
        y, w, W0, b0, A = _validated(
            X, y, sample_weight, coef_init, intercept_init, n_classes, active
        )
        small = resolve_device(X, self.device).type == "cpu" and (
            len(y) * W0.shape[1] * len(A) < _ONE_THREAD_WORK
        )
        with _one_thread() if small else contextlib.nullcontext():
            W, b, self.n_iter_ = self._solve(X, y, w, W0, b0, A, init_logits)
        self.coef_, self.intercept_ = W0.copy(), b0.copy()
        self.coef_[A], self.intercept_[A] = W, b
        self.classes_ = np.arange(len(W0))
        self.active_ = A
        return self

    def _solve(self, X, y, w, W0, b0, A, init_logits=None) -> tuple[np.ndarray, np.ndarray, int]:
        """``(W [A, D], b [A], iterations)``: the active rows at the optimum."""
        import torch

        dev = resolve_device(X, self.device)
        f64 = dict(device=dev, dtype=torch.float64)
        Xt = torch.as_tensor(X).to(dev, torch.float32).contiguous()
        yt, wt = torch.as_tensor(y, device=dev), torch.as_tensor(w, **f64)
        r, zy_frozen = _frozen_terms(Xt, yt, W0, b0, A, init_logits)
        pos = torch.full((len(W0),), -1, dtype=torch.int64, device=dev)
        pos[torch.as_tensor(A, device=dev)] = torch.arange(len(A), device=dev)
        yA = pos[yt]  # the label's active column, -1 when its row is frozen
        has = yA >= 0
        onehot = torch.zeros(len(y), len(A), **f64)
        onehot[has.nonzero()[:, 0], yA[has]] = 1.0
        WA0 = torch.as_tensor(W0[A], **f64)
        theta = torch.cat([WA0.ravel(), torch.as_tensor(b0[A], **f64)]).requires_grad_()
        D, alpha = Xt.shape[1], float(self.alpha)

        @torch.no_grad()  # the gradient is written by hand: no graph to build
        def closure():
            W, b = theta[: len(A) * D].view(len(A), D), theta[len(A) * D :]
            z = (Xt @ W.T.float()).double() + b
            lse = torch.logsumexp(z if r is None else torch.cat([z, r[:, None]], 1), 1)
            zy = torch.where(has, z.gather(1, yA.clamp(min=0)[:, None])[:, 0], zy_frozen)
            loss = (wt * (lse - zy)).sum() + 0.5 * alpha * ((W - WA0) ** 2).sum()
            G = (torch.exp(z - lse[:, None]) - onehot) * wt[:, None]
            gW = (G.float().T @ Xt).double() + alpha * (W - WA0)
            theta.grad = torch.cat([gW.ravel(), G.sum(0)])
            return loss

        opt = torch.optim.LBFGS(
            [theta],
            max_iter=int(self.max_iter),
            max_eval=4 * int(self.max_iter),
            tolerance_grad=float(self.tol),
            tolerance_change=2.2e-9,  # scipy L-BFGS-B's default ftol (factr 1e7)
            history_size=10,
            line_search_fn="strong_wolfe",
        )
        opt.step(closure)
        nit = int(opt.state[opt._params[0]].get("n_iter", 0))
        out = theta.detach().cpu().numpy()
        return out[: len(A) * D].reshape(len(A), D), out[len(A) * D :], nit

    def decision_function(self, X) -> np.ndarray:
        X = X.detach().cpu().numpy() if hasattr(X, "detach") else X  # a tensor, on any device
        return np.asarray(X, np.float32) @ self.coef_.T.astype(np.float32) + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        return _softmax(self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        return self.decision_function(X).argmax(1)


def _frozen_terms(Xt, yt, W0: np.ndarray, b0: np.ndarray, A: np.ndarray, init_logits=None):
    """``(r [N], zy [N])`` float64 on ``Xt``'s device: the log-sum-exp of each row's frozen
    logits (None when every class is active) and its label's logit when that row is frozen
    (0 otherwise). Read from ``init_logits`` when given, else one ``N x D x (C - A)``
    product, in blocks of rows."""
    import torch

    frozen = np.setdiff1d(np.arange(len(W0)), A)
    zy = torch.zeros(len(yt), dtype=torch.float64, device=Xt.device)
    if len(frozen) == 0:
        return None, zy
    if init_logits is not None:
        Z = torch.as_tensor(np.asarray(init_logits), device=Xt.device).double()
        is_frozen = torch.as_tensor(np.isin(np.arange(len(W0)), frozen), device=Xt.device)
        zy = torch.where(is_frozen[yt], Z.gather(1, yt[:, None])[:, 0], zy)
        return torch.logsumexp(Z[:, torch.as_tensor(frozen, device=Xt.device)], 1), zy
    Wf = torch.as_tensor(W0[frozen], dtype=torch.float32, device=Xt.device)
    bf = torch.as_tensor(b0[frozen], dtype=torch.float64, device=Xt.device)
    col = torch.full((len(W0),), -1, dtype=torch.int64, device=Xt.device)
    col[torch.as_tensor(frozen, device=Xt.device)] = torch.arange(len(frozen), device=Xt.device)
    r = torch.empty(len(yt), dtype=torch.float64, device=Xt.device)
    for i in range(0, len(yt), _ROWS):
        z = (Xt[i : i + _ROWS] @ Wf.T).double() + bf
        r[i : i + _ROWS] = torch.logsumexp(z, 1)
        c = col[yt[i : i + _ROWS]]
        zy[i : i + _ROWS] = torch.where(c >= 0, z.gather(1, c.clamp(min=0)[:, None])[:, 0], 0.0)
    return r, zy


def mix_weights(n_real: int, n_added: int, lam: float) -> np.ndarray:
    """Per-example weights of ``n_real`` real then ``n_added`` added examples: the real ones
    share ``1 - lam`` and the added ones ``lam`` of the total (2312.05464's mix)."""
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lambda must be in [0, 1), got {lam}")
    if n_added == 0:
        return np.full(n_real, 1.0 / max(n_real, 1))
    return np.concatenate([np.full(n_real, (1 - lam) / n_real), np.full(n_added, lam / n_added)])
