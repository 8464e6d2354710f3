"""Sign operators: deterministic sign with a tie policy, randomized sign, and
sign momentum (the Lion / Signum family).

All transformations emit a direction of unit magnitude per coordinate; chain
them with ``optax.scale_by_learning_rate`` (or a ready optimizer from this
package) to get a descent update.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sign import _checks
from optax_sign import _sharding


def tie_sign(x: jax.Array, tie: str = "zero") -> jax.Array:
  r"""Sign of ``x`` with a tie policy for exact zeros, in ``x``'s dtype.

  .. math::
    \operatorname{tsign}_T(x) = \operatorname{sign}(x) \text{ for } x \neq 0,
    \quad \operatorname{tsign}_T(0) = 0,\ +1,\ -1
    \text{ for } T = \text{"zero"}, \text{"positive"}, \text{"negative"}.

  NaN stays NaN under every policy, so a bad gradient is never hidden.

  Args:
    x: an array.
    tie: the value given to zeros: ``"zero"``, ``"positive"`` or ``"negative"``.

  Returns:
    An array of ``x``'s shape and dtype with values in {-1, 0, +1} (0 only for
    ``tie="zero"``).
  """
  _checks.check_tie(tie)
  s = jnp.sign(x)
  if tie == "positive":
    s = jnp.where(x == 0, jnp.ones_like(s), s)
  elif tie == "negative":
    s = jnp.where(x == 0, -jnp.ones_like(s), s)
  return s


def reduced_tie_sign(x: jax.Array, tie: str, salt: int = 0) -> jax.Array:
  """:func:`tie_sign` in the form XLA:CPU fuses into a reduction.

  ``sign(sign(x) +- c)`` with ``0 < c < 1`` breaks the ties without a select
  (the same values, NaN and -0 included), so a sum over it stays one
  vectorised (YNNPACK) kernel instead of materialising the signs first. A
  different ``c`` per leaf (``salt``) keeps XLA from merging, and then
  materialising, the broadcast constants of equally shaped leaves. Use it
  where the signs feed sums only; elsewhere :func:`tie_sign` is the faster
  elementwise form.
  """
  s = jnp.sign(x)
  if tie == "zero":
    return s
  c = np.float32(0.5) + np.float32(salt % 2**22) * np.float32(2.0**-24)
  return jnp.sign(s + (c if tie == "positive" else -c))


def scale_by_sign(tie: str = "zero") -> optax.GradientTransformationExtraArgs:
  r"""Replaces each update by its sign: :math:`u = \operatorname{tsign}_T(g)`.

  Chained with a learning rate this is Sign-SGD,
  :math:`x_{t+1} = x_t - \gamma\,\operatorname{sign}(g_t)`.

  Args:
    tie: tie policy for exact zeros (see :func:`tie_sign`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an empty state.

  Example:
    >>> tx = optax.chain(scale_by_sign(), optax.scale_by_learning_rate(1e-3))

  References:
    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex
    Problems", ICML 2018 (arXiv 1802.04434).
  """
  _checks.check_tie(tie)

  def init_fn(params):
    _checks.check_float_params(params)
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda g: tie_sign(g, tie), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class RandomizedSignState(NamedTuple):
  """State of :func:`scale_by_randomized_sign`."""
  key: jax.Array  # PRNG key, replaced by a fresh one after every update


def randomized_sign(key: jax.Array, v: jax.Array, bound: Any) -> jax.Array:
  r"""One sample of the unbiased randomized sign :math:`S_R(v)`.

  Coordinates are independent with
  :math:`P(+1) = (1 + c)/2`, :math:`P(-1) = (1 - c)/2`,
  :math:`c = \operatorname{clip}(v / R, -1, 1)`, so
  :math:`\mathbb{E}[S_R(v)] = v / R` where :math:`|v| \le R` and the sign is
  deterministic where :math:`|v| \ge R`. It never returns 0; NaN stays NaN.
  """
  c = jnp.clip(v.astype(jnp.float32) / bound, -1.0, 1.0)
  w = jax.random.uniform(key, v.shape, jnp.float32)
  s = jnp.where(w < 0.5 * (1.0 + c), 1.0, -1.0)
  return jnp.where(jnp.isnan(c), c, s).astype(v.dtype)


def scale_by_randomized_sign(
    key: jax.Array, bound: float = 1.0) -> optax.GradientTransformationExtraArgs:
  r"""Replaces each update by a randomized sign that is unbiased up to scale.

  .. math::
    u_j = \begin{cases} +1 & \text{w.p. } (1 + c_j)/2 \\
                        -1 & \text{w.p. } (1 - c_j)/2 \end{cases},\qquad
    c_j = \operatorname{clip}(g_j / R, -1, 1),

  so :math:`\mathbb{E}[u] = g / R` whenever :math:`\|g\|_\infty \le R`.
  The key lives in the state and is split on every call: repeated calls give
  fresh samples, and workers holding equal keys draw equal samples. That is
  what a replicated step needs (the outer step of DSM-LS); before a vote, where
  each worker should draw independently, give each worker its own key, e.g.
  ``jax.random.fold_in(key, lax.axis_index(axis))`` when building the state.

  Args:
    key: a JAX PRNG key (``jax.random.key(0)`` or ``jax.random.PRNGKey(0)``).
    bound: the bound :math:`R > 0`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = scale_by_randomized_sign(jax.random.key(0), bound=1.0)

  References:
    Yu et al., "Distributed Sign Momentum with Local Steps for Training
    Transformers", arXiv 2411.17866.
  """
  key = _checks.check_key("key", key)
  _checks.check_positive("bound", bound)

  def init_fn(params):
    _checks.check_float_params(params)
    del params
    return RandomizedSignState(key=_sharding.on_context_mesh(key))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    next_key, sample_key = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(sample_key, max(len(leaves), 1))
    signs = [randomized_sign(k, g, bound) for k, g in zip(keys, leaves)]
    return treedef.unflatten(signs), RandomizedSignState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cast_keeping_sign(v: jax.Array, dtype: Any) -> jax.Array:
  """Casts ``v`` to ``dtype``; nonzero values never round to zero."""
  out = v.astype(dtype)
  if jnp.dtype(dtype) == v.dtype:
    return out
  tiny = jnp.asarray(jnp.finfo(dtype).tiny, dtype)
  return jnp.where((out == 0) & (v != 0), jnp.sign(v).astype(dtype) * tiny, out)


def cast_like(tree: Any, like: Any) -> Any:
  """Casts every leaf of ``tree`` to the dtype of the same leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


class LionMomentumState(NamedTuple):
  """State of :func:`scale_by_lion_momentum`."""
  mu: optax.Updates  # tree like params, dtype ``mu_dtype``: EMA of g (b2)


def scale_by_lion_momentum(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The pre-sign direction of Lion: an interpolation with old momentum.

  .. math::
    v_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t,
    \qquad m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t,\quad m_0 = 0.

  The direction :math:`v_t` uses the *old* momentum. Follow it by a sign
  operator (:func:`scale_by_sign` or :func:`scale_by_randomized_sign`); see
  :func:`sign_momentum` for the usual chain.

  Args:
    b1: interpolation between momentum and gradient, in [0, 1].
    b2: decay of the momentum, in [0, 1].
    mu_dtype: floating dtype of the momentum (``None``: the parameter's, as
      in ``optax.scale_by_lion``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; :math:`v_t` is computed in
    float32 (for lower-precision gradients) and returned in the gradient dtype,
    with values that would underflow to zero kept at the dtype's smallest
    normal number, so that the cast never changes a sign. Where the new
    momentum is not finite (an infinite or NaN gradient coordinate) the
    direction is NaN, so the sign that follows is NaN and
    ``optax.apply_if_finite`` skips the step instead of keeping an infinite
    momentum behind finite signs.

  Example:
    >>> tx = optax.chain(scale_by_lion_momentum(0.9, 0.99),
    ...                  scale_by_randomized_sign(jax.random.key(0), 1.0))

  References:
    Chen et al., "Symbolic Discovery of Optimization Algorithms" (Lion),
    arXiv 2302.06675.
  """
  _checks.check_interval("b1", b1, 0.0, 1.0)
  _checks.check_interval("b2", b2, 0.0, 1.0)
  mu_dtype = _checks.check_float_dtype("mu_dtype", mu_dtype)

  def init_fn(params):
    _checks.check_float_params(params)
    return LionMomentumState(mu=optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    mu = cast_like(optax.tree.update_moment(updates, state.mu, b2, 1),
                   state.mu)
    direction = jax.tree.map(
        lambda g, m, new: jnp.where(
            jnp.isfinite(new),
            _cast_keeping_sign((1.0 - b1) * g + b1 * m, g.dtype),
            jnp.asarray(jnp.nan, g.dtype)),
        updates, state.mu, mu)
    return direction, LionMomentumState(mu=mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sign_momentum(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    *,
    tie: str = "zero",
) -> optax.GradientTransformationExtraArgs:
  r"""Lion-style sign momentum.

  .. math::
    u_t = \operatorname{tsign}_T\big(\beta_1 m_{t-1} + (1 - \beta_1) g_t\big),
    \qquad m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t,\quad m_0 = 0.

  ``chain(scale_by_lion_momentum(b1, b2, mu_dtype), scale_by_sign(tie))``, the
  hard-sign ``optax.scale_by_lion`` with a tie policy.
  With :math:`\beta_1 = \beta_2` it is Signum. Chained with
  ``optax.add_decayed_weights(wd)`` and ``optax.scale_by_learning_rate(lr)`` it
  is ``optax.lion(lr, b1, b2, weight_decay=wd)``. The momentum is readable as
  ``optax.tree.get(state, "mu")``.

  Args:
    b1: interpolation between momentum and gradient for the direction, in [0, 1].
    b2: decay of the momentum, in [0, 1].
    mu_dtype: floating dtype of the momentum (``None``: the parameter's).
    tie: tie policy for exact zeros (see :func:`tie_sign`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; updates come out in the
    gradient's dtype.

  Example:
    >>> tx = optax.chain(sign_momentum(), optax.scale_by_learning_rate(3e-4))

  References:
    Chen et al., "Symbolic Discovery of Optimization Algorithms" (Lion),
    arXiv 2302.06675; Bernstein et al., arXiv 1802.04434 (Signum).
  """
  return optax.chain(scale_by_lion_momentum(b1, b2, mu_dtype),
                     scale_by_sign(tie))
