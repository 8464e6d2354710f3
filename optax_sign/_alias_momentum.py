"""Momentum / Adam-style ALIAS (experimental reconstruction)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sign import _bits
from optax_sign import _checks
from optax_sign import _sign

_F32 = jnp.float32


class AliasMomentumState(NamedTuple):
  """State of :func:`scale_by_alias_momentum` (``distance`` is the one to log)."""
  count: jax.Array  # type: ignore[assignment]  # int32 scalar
  distance: Any  # float32 scalar d (a tree of per-leaf scalars if per_tensor)
  running: Any  # float32 scalar r (likewise)
  mu: optax.Updates  # tree like params, state_dtype: first moment m
  nu: optax.Updates  # tree like params, state_dtype: second moment v
  previous: Any  # g_{t-1}: packed signs (dot="sign_inner", a SignBits) or
  #   the gradient itself (dot="abs_abs", a tree like params, state_dtype)


def scale_by_alias_momentum(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    d0: float = 1e-6,
    r0: float = 0.0,
    dot: str = "sign_inner",
    direction: str = "sign_snr",
    per_tensor: bool = False,
    weight_decay: float = 0.0,
    state_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum / Adam-style ALIAS (experimental reconstruction).

  For :math:`t \ge 1`, with :math:`c_t = \langle g_t,
  \operatorname{sign}(g_{t-1})\rangle` (``dot="sign_inner"``) or
  :math:`\sum |g_t||g_{t-1}|` (``"abs_abs"``):

  .. math::
    r_t = \sqrt{\beta_2} r_{t-1} + (1 - \sqrt{\beta_2}) d_{t-1} c_t,\quad
    d_t = \max(d_{t-1}, r_t),

  then (zero initial moments, no bias correction)
  :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) d_t g_t`,
  :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) d_t^2 g_t^2` and

  .. math::
    u_t = -\alpha_t\Big(d_t\sqrt{\tfrac{m_t^2+\epsilon}{v_t+\epsilon}}
    \operatorname{sign}(m_t) + \lambda x_t\Big)
    \ \text{(``sign_snr``)},\qquad
    u_t = -\alpha_t\Big(\frac{d_t m_t}{\sqrt{v_t}+\epsilon} + \lambda x_t\Big)
    \ \text{(``adam``)}.

  Scalars are global by default; ``per_tensor=True`` keeps one
  :math:`(r, d)` per leaf, as the released code does. It emits the final
  update (minus sign and ``learning_rate`` included).

  Args:
    learning_rate: :math:`\alpha_t`, a scalar or a schedule.
    b1, b2: moment decays in [0, 1).
    eps: :math:`\epsilon > 0`.
    d0: initial distance estimate, > 0.
    r0: initial running estimate, >= 0.
    dot: ``"sign_inner"`` (stores only packed signs of the previous gradient)
      or ``"abs_abs"`` (stores the previous gradient).
    direction: ``"sign_snr"`` or ``"adam"``.
    per_tensor: one distance estimate per leaf instead of a global one.
    weight_decay: decoupled decay :math:`\lambda \ge 0` (needs ``params``).
    state_dtype: dtype of the moments and of the stored gradient.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = scale_by_alias_momentum(learning_rate=1e-3, d0=1.0)

  References:
    Medyakov et al., arXiv 2506.03725 (Adam-like ALIAS); Mishchenko and
    Defazio, "Prodigy", arXiv 2306.06101.
  """
  if not callable(learning_rate):
    _checks.check_nonnegative("learning_rate", learning_rate)
  _checks.check_interval("b1", b1, 0.0, 1.0, high_open=True)
  _checks.check_interval("b2", b2, 0.0, 1.0, high_open=True)
  _checks.check_positive("eps", eps)
  _checks.check_positive("d0", d0)
  _checks.check_nonnegative("r0", r0)
  _checks.check_choice("dot", dot, ("sign_inner", "abs_abs"))
  _checks.check_choice("direction", direction, ("sign_snr", "adam"))
  _checks.check_nonnegative("weight_decay", weight_decay)
  state_dtype = _checks.check_float_dtype("state_dtype", state_dtype)
  has_decay = not _checks.is_static_zero(weight_decay)
  signed = dot == "sign_inner"

  def scalars(params, value):
    if per_tensor:
      return jax.tree.map(lambda _: jnp.asarray(value, _F32), params)
    return jnp.asarray(value, _F32)

  def init_fn(params):
    _checks.check_float_params(params)
    return AliasMomentumState(
        count=jnp.zeros([], jnp.int32),
        distance=scalars(params, d0),
        running=scalars(params, r0),
        mu=optax.tree.zeros_like(params, dtype=state_dtype),
        nu=optax.tree.zeros_like(params, dtype=state_dtype),
        previous=(_bits.zero_signs(params, "zero") if signed
                  else optax.tree.zeros_like(params, dtype=state_dtype)))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if has_decay and params is None:
      raise ValueError("scale_by_alias_momentum with weight_decay > 0 needs "
                       "params: call update(grads, state, params)")
    _check_shapes(updates, state, params)
    t = state.count
    c = _correlation(updates, state.previous, signed, per_tensor)
    rb2 = b2 ** 0.5
    running = jax.tree.map(
        lambda r, d, ci: jnp.where(t > 0, rb2 * r + (1 - rb2) * d * ci, r),
        state.running, state.distance, c)
    dist = jax.tree.map(jnp.maximum, state.distance, running)
    d_tree = (dist if per_tensor
              else jax.tree.map(lambda _: dist, updates))
    mu, nu = _moments(updates, state, d_tree, b1, b2)
    dirs = _direction(mu, nu, d_tree, direction, eps)
    if has_decay:
      dirs = jax.tree.map(lambda u, x: u + weight_decay * x.astype(_F32),
                          dirs, params)
    lr = learning_rate(t) if callable(learning_rate) else learning_rate
    new_updates = jax.tree.map(lambda u, g: (-lr * u).astype(g.dtype),
                               dirs, updates)
    return new_updates, AliasMomentumState(
        count=optax.safe_increment(t),
        distance=dist,
        running=running,
        mu=_sign.cast_like(mu, state.mu),
        nu=_sign.cast_like(nu, state.nu),
        previous=(_bits.pack_signs(updates, "zero") if signed
                  else _sign.cast_like(updates, state.previous)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_shapes(updates: Any, state: AliasMomentumState, params: Any) -> None:
  """Raises for updates shaped unlike ``params`` or the moments of ``init``."""
  if params is not None:
    _checks.check_shapes(
        updates, [jnp.shape(p) for p in jax.tree.leaves(params)], "params")
  _checks.check_shapes(updates, [jnp.shape(m) for m in jax.tree.leaves(
      state.mu)], "the state from init")


def _correlation(updates: Any, previous: Any, signed: bool,
                 per_tensor: bool) -> Any:
  """:math:`c_t`: <g_t, sign(g_{t-1})> or sum |g_t||g_{t-1}|, per leaf or
  summed over the leaves."""
  if signed:
    prev = _bits.unpack_signs(previous, updates)
    c = jax.tree.map(lambda g, s: jnp.sum(g.astype(_F32) * s), updates, prev)
  else:
    c = jax.tree.map(
        lambda g, p: jnp.sum(jnp.abs(g.astype(_F32)) * jnp.abs(
            p.astype(_F32))), updates, previous)
  if not per_tensor:
    c = sum(jax.tree.leaves(c), jnp.zeros([], _F32))
  return c


def _moments(updates: Any, state: AliasMomentumState, d_tree: Any,
             b1: float, b2: float) -> tuple:
  """:math:`m_t` and :math:`v_t` of the distance-scaled gradient, float32."""
  mu = jax.tree.map(
      lambda g, m, d: b1 * m.astype(_F32) + (1 - b1) * d * g.astype(_F32),
      updates, state.mu, d_tree)
  nu = jax.tree.map(
      lambda g, v, d: b2 * v.astype(_F32)
      + (1 - b2) * jnp.square(d * g.astype(_F32)), updates, state.nu, d_tree)
  return mu, nu


def _direction(mu: Any, nu: Any, d_tree: Any, direction: str,
               eps: float) -> Any:
  """``sign_snr``: d sqrt((m^2 + eps) / (v + eps)) sign(m), with ``hypot``
  (m^2 would overflow first); ``adam``: d m / (sqrt(v) + eps)."""
  if direction == "sign_snr":
    return jax.tree.map(
        lambda m, v, d: d * jnp.hypot(m, eps ** 0.5) / jnp.sqrt(v + eps)
        * jnp.sign(m), mu, nu, d_tree)
  return jax.tree.map(lambda m, v, d: d * m / (jnp.sqrt(v) + eps),
                      mu, nu, d_tree)
