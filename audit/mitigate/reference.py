"""The head's previous solver, kept as an oracle: scipy's L-BFGS-B on the full head in numpy.

:class:`ScipyHead` solves the same objective as :class:`~audit.mitigate.head.LinearHead`
(every class moves; ``active`` must be all of them). Tests check the torch solver against
it; ``benchmarks/bench_mitigation.py`` times it as the baseline.
"""

from __future__ import annotations

import numpy as np

from audit.mitigate.head import LinearHead


class ScipyHead(LinearHead):
    """:class:`LinearHead` solved by ``scipy.optimize.minimize(method="L-BFGS-B")`` on the CPU
    (``device`` is ignored), float32 products and float64 parameters, as before the torch
    solver."""

    def _solve(self, X, y, w, W0, b0, A, init_logits=None) -> tuple[np.ndarray, np.ndarray, int]:
        from scipy.optimize import minimize

        C, D = W0.shape
        if len(A) != C:
            raise ValueError("ScipyHead moves every class: active must be None or all of them")
        X = np.ascontiguousarray(X, np.float32)
        Y = np.zeros((len(y), C))
        Y[np.arange(len(y)), y] = 1.0

        def loss_grad(theta):
            W, b = theta[: C * D].reshape(C, D), theta[C * D :]
            Z = (X @ W.T.astype(np.float32)).astype(np.float64) + b
            Zs = Z - Z.max(axis=1, keepdims=True)
            logp = Zs - np.log(np.exp(Zs).sum(axis=1, keepdims=True))
            loss = -(w * (Y * logp).sum(1)).sum() + 0.5 * self.alpha * ((W - W0) ** 2).sum()
            G = (np.exp(logp) - Y) * w[:, None]
            GX = (X.T @ G.astype(np.float32)).T.astype(np.float64)  # X^T G: the fast memory order
            return loss, np.concatenate([(GX + self.alpha * (W - W0)).ravel(), G.sum(0)])

        res = minimize(
            loss_grad,
            np.concatenate([W0.ravel(), b0]),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": int(self.max_iter), "gtol": self.tol},
        )
        return res.x[: C * D].reshape(C, D), res.x[C * D :], int(res.nit)
