"""Error-feedback sign compression (EF-SignSGD), on one worker or across many."""

import math
from typing import Any, NamedTuple, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sign import _checks
from optax_sign import _communication
from optax_sign import _sharding
from optax_sign import _sign


class ErrorFeedbackState(NamedTuple):
  """State of :func:`scale_by_error_feedback_sign`."""
  error: optax.Updates  # tree like params, dtype ``state_dtype``: residual e_t


def _scale(p: jax.Array, shard_axes: tuple = ()) -> jax.Array:
  """The least-squares scale ``||p||_1 / n`` of one whole leaf, in float32.

  Under a fully manual ``shard_map`` a leaf that varies over ``shard_axes``
  (mesh axes other than the workers', e.g. ``"model"``) is one shard of the
  leaf: the sum and the size then cover every shard. Each term is divided
  by ``n`` before the sum, so the sum never exceeds ``max |p|`` and cannot
  overflow where ``p`` is finite.
  """
  size = p.size * math.prod(_communication.axis_size(a) for a in shard_axes)
  total = jnp.sum(jnp.abs(p) * (1.0 / max(size, 1)))
  return lax.psum(total, shard_axes) if shard_axes else total


def _compress(p: jax.Array, dtype: Any) -> jax.Array:
  """Scaled sign ``(||p||_1 / n) sign(p)`` of one leaf, returned in ``dtype``."""
  return (_scale(p) * jnp.sign(p)).astype(dtype)


def _shard_axes(p: jax.Array, axis_name) -> tuple:
  workers = _communication.axis_names(axis_name)
  return tuple(a for a in _communication.varying_axes(p) if a not in workers)


def _group_mean(p_leaves, scales, axis_name, num_workers, own, live):
  """:func:`_mean_of_scaled_signs` for leaves that vary over the same axes,
  with their whole-leaf ``scales`` [L].

  Returns:
    (own compressed leaves, mean leaves), flat float32 vectors per leaf.
  """
  flat = jnp.concatenate([p.ravel() for p in p_leaves])
  if own is not None:  # a dead worker sends zero scales: it adds nothing
    scales = jnp.where(own, scales, 0.0)
  message = jnp.concatenate([
      jnp.packbits(flat >= 0, bitorder="little"),
      lax.bitcast_convert_type(scales, jnp.uint8).ravel()])
  received = _communication.gather_invariant(message, axis_name)
  packed_size = -(-flat.size // 8)
  starts = np.cumsum([0] + [p.size for p in p_leaves])
  signs, alphas = [], []
  for i in range(num_workers):
    bits = jnp.unpackbits(received[i, :packed_size], count=flat.size,
                          bitorder="little")
    signs.append(2.0 * bits.astype(jnp.float32) - 1.0)
    alphas.append(lax.bitcast_convert_type(
        received[i, packed_size:].reshape(-1, 4), jnp.float32))
  mine, mean = [], []
  for j, p in enumerate(p_leaves):  # one scalar scale per leaf and worker
    cut = slice(int(starts[j]), int(starts[j + 1]))
    mine.append(scales[j] * jnp.where(p.ravel() >= 0, 1.0, -1.0))
    total = None  # a static sum, in worker order on every worker
    for sign, alpha in zip(signs, alphas):
      term = alpha[j] * sign[cut]
      total = term if total is None else total + term
    mean.append(jnp.where(live > 0, total / jnp.maximum(live, 1.0), 0.0))
  return mine, mean


def _bits_in_layout(p: jax.Array) -> jax.Array:
  """The bits ``p >= 0`` packed along the last axis, 8 neighbours a byte
  (the last axis zero-padded to a multiple of 8): ``[..., ceil(L / 8)]``
  uint8, laid out like ``p`` over its other axes."""
  shape = p.shape or (1,)
  q = (p.reshape(shape) >= 0).astype(jnp.uint8)
  q = jnp.pad(q, [(0, 0)] * (len(shape) - 1) + [(0, -shape[-1] % 8)])
  q = q.reshape(q.shape[:-1] + (q.shape[-1] // 8, 8))
  return jnp.sum(q << jnp.arange(8, dtype=jnp.uint8), axis=-1,
                 dtype=jnp.uint8)


def _signs_in_layout(packed: jax.Array, p: jax.Array) -> jax.Array:
  """Inverse of :func:`_bits_in_layout`: +-1 in float32, shaped like ``p``."""
  shape = p.shape or (1,)
  bits = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
  bits = bits.reshape(packed.shape[:-1] + (-1,))[..., :shape[-1]]
  return (2.0 * bits.astype(jnp.float32) - 1.0).reshape(p.shape)


def _mean_in_layout(p_leaves, scales, axis_name, num_workers, own, live):
  """:func:`_mean_of_scaled_signs` where other mesh axes are Auto (inside
  ``jit`` the leaves' layouts over them are unknown): leaf by leaf, with the
  bits packed along the last axis so each leaf keeps its layout (nothing is
  resharded), and the scales in one small all-gather. The same terms in the
  same order as the flattened exchange, so the same bits."""
  scales = jnp.stack(scales)
  if own is not None:  # a dead worker sends zero scales: it adds nothing
    scales = jnp.where(own, scales, 0.0)
  alphas = _communication.gather_invariant(scales, axis_name)
  mine, mean = [], []
  for j, p in enumerate(p_leaves):
    received = _communication.gather_invariant(_bits_in_layout(p), axis_name)
    total = None  # a static sum, in worker order on every worker
    for i in range(num_workers):
      term = alphas[i, j] * _signs_in_layout(received[i], p)
      total = term if total is None else total + term
    mine.append(scales[j] * jnp.where(p >= 0, 1.0, -1.0))
    mean.append(jnp.where(live > 0, total / jnp.maximum(live, 1.0), 0.0))
  return mine, mean


def _mean_of_scaled_signs(p_leaves, axis_name, num_workers, own=None,
                          live=None):
  """Per-worker compression and the mean of all workers' compressed vectors.

  Worker i sends its sign bits (``p >= 0``, packed 8 per byte) and one float32
  scale per leaf, in one all-gather of uint8 per group of leaves that vary over
  the same mesh axes (:func:`optax_sign._communication.leaf_groups`); every
  worker then forms ``(1 / N) sum_i alpha_i sign_i`` in the same order, so all
  get equal bits.

  Dead workers (``own`` False on them) send zero scales and the mean is over
  the ``live`` ones (0 when none is alive).

  Returns:
    (own compressed leaves c_i, mean leaves), both float32.
  """
  live = jnp.float32(num_workers) if live is None else live
  # Whole-leaf scales first: the compiler sums leaves sharded over axes that
  # are not manual here; _scale sums the manual shards.
  scales = [_scale(p, _shard_axes(p, axis_name)) for p in p_leaves]
  if _sharding.unknown_layout_axes():
    return _mean_in_layout(p_leaves, scales, axis_name, num_workers, own,
                           live)

  count = len(p_leaves)

  def by_group(twice, shared):  # outputs: own leaves, then mean leaves
    (scales, own, live), leaves, out = shared, twice[:count], [None] * 2 * count
    for group in _communication.leaf_groups(leaves):
      parts = _group_mean([leaves[i] for i in group],
                          jnp.stack([scales[i] for i in group]), axis_name,
                          num_workers, own, live)
      for i, c, m in zip(group, *parts):
        out[i] = c.reshape(leaves[i].shape)
        out[count + i] = m.reshape(leaves[i].shape)
    return out

  out = _sharding.on_local_shards(by_group, list(p_leaves) * 2,
                                  (scales, own, live))
  return out[:count], out[count:]


def scale_by_error_feedback_sign(
    state_dtype: Any = "float32",
    axis_name: Optional[_communication.AxisName] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Error-feedback sign compression, on one worker or averaged across workers.

  .. math::
    p_t = g_t + e_t,\qquad
    c_t = \frac{\|p_t\|_1}{n}\,\operatorname{sign}(p_t),\qquad
    e_{t+1} = p_t - c_t,

  per leaf (:math:`n` its size), with norms accumulated in float32. On one
  worker (``axis_name=None``) the update is :math:`u_t = c_t`, and the residual
  keeps what compression dropped, so
  :math:`\sum_{s \le t} u_s + e_{t+1} = \sum_{s \le t} g_s`.

  Across the :math:`N` workers of ``axis_name`` (mean of scaled signs), worker
  :math:`i` compresses its own :math:`p_{i,t} = g_{i,t} + e_{i,t}` with the
  sign bit :math:`p \ge 0` (an exact zero counts as :math:`+1`), sends the
  packed bits and one float32 scale per leaf in a single all-gather, and every
  worker outputs the same :math:`u_t = \frac{1}{N}\sum_i c_{i,t}`. With the
  extra argument ``alive=`` (this worker's flag, or a replicated mask of shape
  ``(N,)``; e.g. ``alive=all(isfinite(g))``) the mean is over the live workers
  only, a dead worker keeps its residual, and with no live worker the update
  is 0. The residual
  :math:`e_{i,t+1} = p_{i,t} - c_{i,t}` stays **per worker**: about
  :math:`(N-1)(1/8 + 4L/d)` bytes per parameter are sent (:math:`L` leaves).

  **State placement and checkpoints.** With ``axis_name`` the residual differs
  from worker to worker. Under ``pmap`` it is per device. Under
  ``jax.shard_map``, keep it with a leading worker axis outside the mapped
  function, e.g. ``jax.tree.map(lambda x: jnp.stack([x] * N), tx.init(params))``
  passed with ``in_specs=P(axis)`` / ``out_specs=P(axis)``, and drop/restore
  the leading axis of the local block (``x[0]`` / ``x[None]``) inside. Save
  that whole stacked state in checkpoints: restoring every worker's residual
  makes a resumed run continue bitwise (resetting it changes the trajectory).

  Follow it by a learning-rate scale.

  Args:
    state_dtype: floating dtype of the residual (float32 by default;
      ``None``: the parameter's).
    axis_name: the workers' axis name (or tuple) for the mean of scaled signs
      across workers; ``None`` for one worker and no collective.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; updates come out in the
    gradient's dtype and, on one worker, the residual accounts for that
    rounding too.

  Example:
    >>> tx = optax.chain(scale_by_error_feedback_sign(axis_name="data"),
    ...                  optax.scale_by_learning_rate(1e-2))

  References:
    Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes", ICML 2019 (arXiv 1901.09847); Tang et al., "1-bit
    Adam: Communication Efficient Large-Scale Training with Adam's Convergence
    Speed", ICML 2021 (arXiv 2102.02888).
  """
  state_dtype = _checks.check_float_dtype("state_dtype", state_dtype)

  def init_fn(params):
    _checks.check_float_params(params)
    return ErrorFeedbackState(
        error=optax.tree.zeros_like(params, dtype=state_dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del params
    _checks.warn_misspelled(extra_args)
    p = jax.tree.map(lambda g, e: g.astype(jnp.float32) + e.astype(jnp.float32),
                     updates, state.error)
    if axis_name is None:
      u = jax.tree.map(lambda x, g: _compress(x, g.dtype), p, updates)
      error = jax.tree.map(lambda x, c: (x - c.astype(jnp.float32)), p, u)
      _, own = _communication.alive_flags(extra_args.get("alive"), None, 1)
      if own is not None:  # a dead step: no update, the residual stays
        u = jax.tree.map(lambda c: jnp.where(own, c, jnp.zeros_like(c)), u)
        error = jax.tree.map(lambda new, old: jnp.where(
            own, new, old.astype(jnp.float32)), error, state.error)
    else:
      n = _communication.axis_size(axis_name)
      alive, own = _communication.alive_flags(extra_args.get("alive"),
                                              axis_name, n)
      live = (None if alive is None
              else _communication.live_workers(axis_name, n, alive, own))
      leaves, treedef = jax.tree.flatten(p)
      mine, mean = _mean_of_scaled_signs(leaves, axis_name, n, own, live)
      error = treedef.unflatten([x - c for x, c in zip(leaves, mine)])
      if own is not None:  # a dead worker keeps its residual
        error = jax.tree.map(lambda new, old: jnp.where(
            own, new, old.astype(jnp.float32)), error, state.error)
      u = jax.tree.map(lambda m, g: m.astype(g.dtype),
                       treedef.unflatten(mean), updates)
    return u, ErrorFeedbackState(error=_sign.cast_like(error, state.error))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
