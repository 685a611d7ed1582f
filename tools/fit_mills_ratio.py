"""Fit the polynomial that cpu_kernel.c's ``gelu_grad_d`` evaluates, and print it as C.

GELU's derivative needs the upper tail of the normal distribution, 1 - Phi(a) = phi(a) R(a),
where R is the Mills ratio (smooth on a >= 0, about 1 / a for large a). With t = K / (K + a),
R is a smooth function of t on (0, 1], approximated here by a polynomial of degree DEGREE in t:
interpolation at Chebyshev nodes of t over a in [0, A_MAX] against mpmath at 40 digits,
converted to powers of t (evaluated by Horner's rule in the kernel), then checked on a dense
grid of a. Beyond A_MAX the kernel clamps a: phi(a) is below 1e-300 there.

    python tools/fit_mills_ratio.py        (needs mpmath and numpy)
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

K = 4.0
A_MAX = 40.0
DEGREE = 17
NODES = 300


def mills(a: float) -> float:
    """R(a) = (1 - Phi(a)) / phi(a), to float64 from 40-digit arithmetic."""
    x = mp.mpf(a)
    return float(mp.erfc(x / mp.sqrt(2)) / 2 / (mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)))


def fit() -> np.ndarray:
    """The coefficients of t^0 .. t^DEGREE."""
    t0 = K / (K + A_MAX)
    nodes = np.cos(np.pi * (np.arange(NODES) + 0.5) / NODES)
    ts = t0 + (1 - t0) * (nodes + 1) / 2
    values = np.array([mills(K * (1 - t) / t) for t in ts])
    cheb = np.polynomial.Chebyshev.fit(ts, values, DEGREE, domain=[t0, 1])
    return cheb.convert(kind=np.polynomial.Polynomial, domain=[-1, 1]).coef


def main() -> None:
    mp.mp.dps = 40
    coef = fit()
    grid = np.concatenate([np.linspace(0, 5, 2001), np.linspace(5, A_MAX, 701)])
    t = K / (K + grid)
    approx = np.zeros_like(t)
    for c in coef[::-1]:
        approx = approx * t + c
    exact = np.array([mills(a) for a in grid])
    print(
        f"/* largest relative error on {grid.size} points of [0, {A_MAX:g}]: "
        f"{np.max(np.abs(approx / exact - 1)):.2e} */"
    )
    print(f"static const double mills[{DEGREE + 1}] = {{ /* t^{DEGREE} first */")
    print(",\n".join(f"    {float(c)!r}" for c in coef[::-1]))
    print("};")


if __name__ == "__main__":
    main()
