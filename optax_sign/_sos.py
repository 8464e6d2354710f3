"""SOS: bisection search for a near-optimal fixed Sign-SGD stepsize.

A Python driver (not a ``GradientTransformation``): it runs deterministic
constant-stepsize Sign-SGD several times from the same start and bisects on
:math:`\\log\\gamma` with the fixed-point test of ``docs/algorithms/alias.md``
(section "SOS: bisection over fixed stepsizes").
"""

import math
from typing import Any, Callable, List, NamedTuple, Optional, Tuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from optax_sign import _checks
from optax_sign import _sign

# run(gamma, num_steps) -> (losses f(x_0..x_T), smoothness samples L_hat_t)
RunFn = Callable[[float, int], Tuple[Any, Any]]


class SOSProbe(NamedTuple):
  """One constant-stepsize run of :func:`sos_search`."""
  stepsize: float  # gamma of the run
  distance: float  # Delta_hat = f(x_0) - min_t f(x_t)
  smoothness: float  # L_hat = max_t L_hat_t
  phi: float  # sqrt(2 Delta_hat / (L_hat T)), inf if L_hat = 0
  final_loss: float  # f(x_T)
  kind: str  # "lo" or "hi" (bracket check) or "mid" (bisection)


class SOSResult(NamedTuple):
  """Result of :func:`sos_search`."""
  stepsize: float  # the chosen gamma (the final lower end of the bracket)
  best_stepsize: float  # the probe with the lowest final loss
  probes: List[SOSProbe]  # every run, in order
  bracket_valid: bool  # False if an endpoint failed the bracket test
  message: str  # what happened, in words


def sign_sgd_probe(loss_fn: Callable[[Any], jax.Array],
                   init_params: Any) -> RunFn:
  r"""A ``run(gamma, num_steps)`` for :func:`sos_search` from a loss function.

  Runs :math:`x_{t+1} = x_t - \gamma\operatorname{sign}(\nabla f(x_t))` from
  ``init_params`` (full batch, deterministic) and records
  :math:`f(x_0), \dots, f(x_T)` and the samples
  :math:`\hat L_t = \|g_t - g_{t-1}\|_1 / \|x_t - x_{t-1}\|_\infty` (0 when the
  iterate did not move). Compiled once per ``num_steps``.

  Args:
    loss_fn: deterministic loss of a parameter tree, returning a scalar.
    init_params: the start :math:`x_0`.

  Returns:
    ``run(gamma, num_steps) -> (losses[T + 1], smoothness[T])`` as NumPy arrays.
  """
  grad_fn = jax.value_and_grad(loss_fn)

  def l1(tree):
    return sum(jnp.sum(jnp.abs(x), dtype=jnp.float32)
               for x in jax.tree.leaves(tree))

  def linf(tree):
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0).astype(
        jnp.float32) for x in jax.tree.leaves(tree)]))

  def trace(gamma, num_steps):
    def body(carry, _):
      x, g = carry
      x_new = jax.tree.map(lambda p, d: p - (gamma * _sign.tie_sign(d)
                                             ).astype(p.dtype), x, g)
      f_new, g_new = grad_fn(x_new)
      den = linf(jax.tree.map(jnp.subtract, x_new, x))
      l_hat = jnp.where(den > 0, l1(jax.tree.map(jnp.subtract, g_new, g))
                        / jnp.where(den > 0, den, 1.0), 0.0)
      return (x_new, g_new), (f_new.astype(jnp.float32), l_hat)

    f0, g0 = grad_fn(init_params)
    _, (losses, l_hats) = jax.lax.scan(body, (init_params, g0), None,
                                       length=num_steps)
    return jnp.concatenate([f0.astype(jnp.float32)[None], losses]), l_hats

  compiled = jax.jit(trace, static_argnums=1)

  def run(gamma: float, num_steps: int):
    losses, l_hats = compiled(jnp.float32(gamma), num_steps)
    return np.asarray(losses), np.asarray(l_hats)

  return run


def _probe(run: RunFn, gamma: float, num_steps: int, kind: str) -> SOSProbe:
  losses, l_hats = run(gamma, num_steps)
  losses = np.asarray(losses, np.float64)
  l_hats = np.asarray(l_hats, np.float64)
  finite = losses[np.isfinite(losses)]
  delta = float(losses[0] - finite.min()) if finite.size else 0.0
  l_max = float(np.max(l_hats, initial=0.0))
  l_max = l_max if math.isfinite(l_max) else math.inf
  phi = math.sqrt(2.0 * delta / (l_max * num_steps)) if l_max > 0 else math.inf
  return SOSProbe(float(gamma), delta, l_max, phi, float(losses[-1]), kind)


def num_bisection_probes(lo: float, hi: float, ratio: float) -> int:
  r"""Bisection probes until :math:`hi/lo \le \rho`:
  :math:`\lceil \log_2(\ln(hi/lo) / \ln\rho) \rceil` (0 if already there)."""
  if hi / lo <= ratio:
    return 0
  return math.ceil(math.log2(math.log(hi / lo) / math.log(ratio)))


def sos_search(run: RunFn,
               num_steps: int,
               lo: float = 1e-8,
               hi: float = 1.0,
               ratio: float = 2.0,
               max_probes: Optional[int] = None,
               check_bracket: bool = True) -> SOSResult:
  r"""SOS Sign-SGD: bisection over fixed stepsizes on :math:`\log\gamma`.

  Each probe runs ``num_steps`` (:math:`T`) steps of constant-:math:`\gamma`
  Sign-SGD from :math:`x_0` and computes
  :math:`\hat\Delta(\gamma) = f(x_0) - \min_t f(x_t)`,
  :math:`\hat L(\gamma) = \max_t \hat L_t` and

  .. math::
    \phi(\gamma) = \sqrt{2\hat\Delta / (\hat L T)}\quad(+\infty
    \text{ if } \hat L = 0).

  With ``mid = sqrt(lo * hi)``: if :math:`\phi(mid) \ge mid` then ``lo = mid``
  else ``hi = mid``, until ``hi / lo <= ratio`` or ``max_probes`` bisection
  probes were made, i.e. :math:`\lceil\log_2(\ln(hi/lo)/\ln\rho)\rceil`
  probes (5 for a 1e8 range and ratio 2). With ``check_bracket`` both ends
  are probed first (two more runs); if :math:`\phi(lo) < lo` or
  :math:`\phi(hi) \ge hi` the bracket is invalid: a warning says so and the
  failing end is returned.

  Args:
    run: ``run(gamma, num_steps) -> (losses, smoothness)`` with
      ``losses = [f(x_0), ..., f(x_T)]`` and the smoothness samples of the run
      (see :func:`sign_sgd_probe`).
    num_steps: :math:`T`, steps per probe.
    lo, hi: the bracket, ``0 < lo < hi``.
    ratio: stop when ``hi / lo <= ratio`` (> 1).
    max_probes: optional cap on the bisection probes.
    check_bracket: probe both ends first.

  Returns:
    An :class:`SOSResult` with the chosen stepsize (``lo`` at the end), the
    best probe by final loss and every probe.

  Example:
    >>> run = sign_sgd_probe(lambda p: loss_fn(p, batch), params)
    >>> result = sos_search(run, num_steps=200, lo=1e-4, hi=10.0)
    >>> result.bracket_valid, len(result.probes)  # 2 bracket checks + 5 probes
    (True, 7)
    >>> tx = optax_sign.sign_sgd(result.stepsize)

  References:
    Medyakov et al., arXiv 2506.03725 (SOS Sign-SGD); Carmon and Hinder,
    "Making SGD Parameter-Free", COLT 2022 (arXiv 2205.02160).
  """
  _checks.check_int("num_steps", num_steps, 1)
  _checks.check_positive("lo", lo)
  _checks.check_positive("hi", hi)
  if not lo < hi:
    raise ValueError(f"the bracket needs lo < hi, got lo={lo}, hi={hi}")
  _checks.check_interval("ratio", ratio, 1.0, float("inf"), low_open=True)
  if max_probes is not None:
    _checks.check_int("max_probes", max_probes, 0)

  probes: List[SOSProbe] = []

  def finish(stepsize, valid, message):
    if not valid:
      warnings.warn(message, stacklevel=3)
    best = min(probes, key=lambda p: (not math.isfinite(p.final_loss),
                                      p.final_loss)) if probes else None
    return SOSResult(float(stepsize),
                     best.stepsize if best else float(stepsize),
                     probes, valid, message)

  if check_bracket:
    probes.append(_probe(run, lo, num_steps, "lo"))
    if probes[-1].phi < lo:
      return finish(lo, False, f"invalid bracket: phi(lo)={probes[-1].phi:.3g}"
                    f" < lo={lo:.3g}; lower lo. Returning lo.")
    probes.append(_probe(run, hi, num_steps, "hi"))
    if probes[-1].phi >= hi:
      return finish(hi, False, f"invalid bracket: phi(hi)={probes[-1].phi:.3g}"
                    f" >= hi={hi:.3g}; raise hi. Returning hi.")
  made = 0
  while hi / lo > ratio and (max_probes is None or made < max_probes):
    mid = math.sqrt(lo * hi)
    probes.append(_probe(run, mid, num_steps, "mid"))
    made += 1
    if probes[-1].phi >= mid:
      lo = mid
    else:
      hi = mid
  done = "converged" if hi / lo <= ratio else "stopped at max_probes"
  return finish(lo, True, f"{done} after {made} bisection probes: "
                f"bracket [{lo:.3g}, {hi:.3g}]")
