"""Error-feedback sign compression (EF-SignSGD)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sign import _checks


class ErrorFeedbackState(NamedTuple):
  """State of :func:`scale_by_error_feedback_sign`."""
  error: optax.Updates  # tree like params, dtype ``state_dtype``: residual e_t


def _compress(p: jax.Array, dtype: Any) -> jax.Array:
  """Scaled sign ``(||p||_1 / n) sign(p)`` of one leaf, returned in ``dtype``."""
  scale = jnp.sum(jnp.abs(p)) / max(p.size, 1)
  return (scale * jnp.sign(p)).astype(dtype)


def scale_by_error_feedback_sign(
    state_dtype: Any = jnp.float32) -> optax.GradientTransformationExtraArgs:
  r"""Error-feedback sign compression on one worker.

  .. math::
    p_t = g_t + e_t,\qquad
    u_t = \frac{\|p_t\|_1}{n}\,\operatorname{sign}(p_t),\qquad
    e_{t+1} = p_t - u_t,

  per leaf (:math:`n` its size), with norms accumulated in float32. The residual
  keeps what compression dropped, so
  :math:`\sum_{s \le t} u_s + e_{t+1} = \sum_{s \le t} g_s`. Follow it by a
  learning-rate scale.

  Args:
    state_dtype: floating dtype of the residual (float32 by default).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; updates come out in the
    gradient's dtype and the residual accounts for that rounding too.

  Example:
    >>> tx = optax.chain(scale_by_error_feedback_sign(),
    ...                  optax.scale_by_learning_rate(1e-2))

  References:
    Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes", ICML 2019 (arXiv 1901.09847).
  """
  state_dtype = _checks.check_float_dtype("state_dtype", state_dtype)

  def init_fn(params):
    return ErrorFeedbackState(
        error=optax.tree.zeros_like(params, dtype=state_dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    p = jax.tree.map(lambda g, e: g.astype(jnp.float32) + e.astype(jnp.float32),
                     updates, state.error)
    u = jax.tree.map(lambda x, g: _compress(x, g.dtype), p, updates)
    error = jax.tree.map(lambda x, c: (x - c.astype(jnp.float32)), p, u)
    return u, ErrorFeedbackState(error=optax.tree.cast(error, state_dtype))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
