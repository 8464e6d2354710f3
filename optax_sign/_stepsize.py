"""ALIAS: parameter-free stepsizes for Sign-SGD (and its momentum variant).

ALIAS sets the Sign-SGD stepsize online as :math:`\\gamma_t = \\sqrt{D_t/\\eta_t}`,
where :math:`\\eta_t` sums local :math:`L_\\infty`-smoothness samples built from
gradient and iterate differences and :math:`D_t` estimates the initial
suboptimality. Norms and inner products are global over the pytree the
transformation sees and are accumulated in float32. The specification is
``spec/alias.md`` (section 4 is the algorithm implemented here).
"""

from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sign import _checks
from optax_sign import _communication
from optax_sign import _sign

AxisName = Union[str, Sequence[str], None]
DISTANCES = ("gap", "lower_bound")
MEMORIES = ("full", "sign")
_F32 = jnp.float32


# ----------------------------------------------------------------------------
# Global reductions (float32) and packed sign storage.


def _global_reduce(terms: Sequence[tuple], worker_axes: tuple = ()) -> list:
  """Global float32 reductions of several trees in one pass over the leaves.

  Each term is ``("sum", tree)`` or ``("max", tree)`` (the max of nonnegative
  values, 0 for an empty tree); all trees share one structure. Per leaf the
  terms go through a single variadic ``lax.reduce``: XLA fuses the
  elementwise producers into it, so every input leaf is read once and no
  parameter-sized intermediate is materialised (a single-operand sum on CPU
  may instead become a library call whose inputs are materialised).

  Under a fully manual ``shard_map`` a leaf that varies over mesh axes other
  than ``worker_axes`` (a tensor-parallel shard) is one piece of a larger
  leaf: the totals of such leaves are combined over those axes (one ``psum``
  of the sums and one ``pmax`` of the maxima per set of axes), so replicated
  leaves count once and sharded leaves cover every shard.

  Args:
    terms: a sequence of ``(kind, tree)`` pairs.
    worker_axes: the workers' axes, whose statistics stay per worker.

  Returns:
    One float32 scalar per term.
  """
  kinds = tuple(kind for kind, _ in terms)

  def combine(a, b):
    return tuple(x + y if kind == "sum" else jnp.maximum(x, y)
                 for kind, x, y in zip(kinds, a, b))

  zeros = tuple(jnp.zeros([], _F32) for _ in kinds)
  by_shard: dict = {}
  for ops in zip(*(jax.tree.leaves(tree) for _, tree in terms)):
    ops = tuple(x.astype(_F32) for x in ops)
    shard = tuple(a for a in _communication.varying_axes(ops[0])
                  if a not in worker_axes)
    by_shard[shard] = combine(by_shard.get(shard, zeros), jax.lax.reduce(
        ops, tuple(np.float32(0) for _ in ops), combine,
        tuple(range(ops[0].ndim))))
  totals = zeros
  for shard, part in by_shard.items():
    if shard:
      part = _combine_shards(kinds, part, shard)
    totals = combine(totals, part)
  return list(totals)


def _combine_shards(kinds: tuple, part: tuple, axes: tuple) -> tuple:
  """Sums (``psum``) and maxima (``pmax``) of ``part`` over ``axes``."""
  out = list(part)
  for kind, reduce in (("sum", jax.lax.psum), ("max", jax.lax.pmax)):
    idx = [i for i, k in enumerate(kinds) if k == kind]
    if idx:
      combined = reduce(jnp.stack([part[i] for i in idx]), axes)
      for i, value in zip(idx, jnp.unstack(combined)):
        out[i] = value
  return tuple(out)


def _bit_layout(shape: Sequence[int]) -> tuple:
  """Shapes used to pack an array of ``shape`` 8 bits per byte.

  Runs of 8 consecutive elements of the last axis share a byte (bit ``k``
  holds element ``8 j + k``), so packing and unpacking keep the array's
  layout and fuse into elementwise passes. Without a last axis whose length
  is a multiple of 8 the array is flattened and padded first.

  Returns:
    ``(bits_shape, padded)``: the shape of the packed uint8 array and whether
    the array is flattened and padded.
  """
  shape = tuple(shape)
  if shape and shape[-1] % 8 == 0:
    return shape[:-1] + (shape[-1] // 8,), False
  return (-(-int(np.prod(shape, dtype=np.int64)) // 8),), True


def _pack(mask: jax.Array) -> jax.Array:
  """Packs a boolean array 8 per byte (uint8, see :func:`_bit_layout`)."""
  bits_shape, padded = _bit_layout(mask.shape)
  if padded:
    mask = jnp.pad(mask.reshape(-1), (0, 8 * bits_shape[0] - mask.size))
  mask = mask.reshape(bits_shape + (8,)).astype(jnp.uint8)
  # A reduction, which XLA does not fuse into its consumers: the update then
  # reads the packed bits, not the gradient again.
  return jnp.sum(mask << np.arange(8, dtype=np.uint8), axis=-1,
                 dtype=jnp.uint8)


def _unpack(bits: jax.Array, like: jax.Array) -> jax.Array:
  """The boolean array of ``like``'s shape packed by :func:`_pack`."""
  _, padded = _bit_layout(like.shape)
  mask = (bits[..., None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)
  if padded:
    return mask.reshape(-1)[:like.size].reshape(like.shape) != 0
  return mask.reshape(like.shape) != 0


def _zero_bits(x: Any) -> jax.Array:
  return jnp.zeros(_bit_layout(x.shape)[0], jnp.uint8)


def _pack_signs(signs: Any, tie: str) -> tuple:
  """Packs a tree of signs: (positive plane, nonzero plane or ())."""
  positive = jax.tree.map(lambda s: _pack(s > 0), signs)
  if tie != "zero":
    return positive, ()
  return positive, jax.tree.map(lambda s: _pack(s != 0), signs)


def _unpack_signs(positive: Any, nonzero: Any, like: Any) -> Any:
  """The float32 tree of signs stored by :func:`_pack_signs`."""
  def one(p, x, nz=None):
    s = jnp.where(_unpack(p, x), 1.0, -1.0).astype(_F32)
    return s if nz is None else jnp.where(_unpack(nz, x), s, 0.0)
  if _absent(nonzero):
    return jax.tree.map(one, positive, like)
  return jax.tree.map(lambda p, x, nz: one(p, x, nz), positive, like, nonzero)


def _absent(tree: Any) -> bool:
  """True for the empty tuple that stands for a field a configuration lacks."""
  return isinstance(tree, tuple) and not tree


def _concrete_int(value: Any) -> Optional[int]:
  """An integer hyperparameter's value; None while it is traced."""
  return None if isinstance(value, jax.core.Tracer) else int(value)


def _scalar_loss(value: Any) -> jax.Array:
  """The ``value=`` extra argument as a float32 scalar."""
  if jnp.ndim(value) != 0:
    raise ValueError(
        "value= must be the scalar loss, got an array of shape "
        f"{jnp.shape(value)}; pass the mean over the batch (e.g. "
        "loss.mean())")
  return jnp.asarray(value, _F32)


def _check_warmup(warmup_steps: Any, warmup_stepsize: Any) -> None:
  """A warmup needs its stepsize (scalar or schedule)."""
  if warmup_stepsize is None:
    if _concrete_int(warmup_steps) not in (0, None):
      raise ValueError(
          "warmup_stepsize (a scalar or a schedule) is required when "
          f"warmup_steps > 0, got warmup_steps={warmup_steps}")
  else:
    _checks.check_nonnegative_or_schedule("warmup_stepsize", warmup_stepsize)


def _pmean(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


# ----------------------------------------------------------------------------
# ALIAS Sign-SGD.


class AliasState(NamedTuple):
  """State of :func:`scale_by_alias`.

  ``stepsize``, ``smoothness`` and ``distance`` are the fields to log, e.g.
  ``optax.tree.get(state, "stepsize")``. Tree fields that a configuration does
  not need are empty tuples.
  """
  count: jax.Array  # type: ignore[assignment]  # int32: updates so far (t)
  stepsize: jax.Array  # float32 scalar: gamma of the last update
  smoothness: jax.Array  # float32 scalar: eta, the sum of smoothness samples
  distance: jax.Array  # float32 scalar: D (d for "gap", f(x0)-f_lower else)
  d_tilde: jax.Array  # float32 scalar: sum of -<g_t, x_t - x_{t-k}> ("gap")
  f_diff: jax.Array  # float32 scalar: max(f(x0) - f_lower, 0)
  last_update_norm: jax.Array  # float32 scalar: U = ||u_{t-1}||_inf
  last_inner: jax.Array  # float32 scalar: A = -<g_{t-1}, u_{t-1}> ("sign")
  grad_snapshot: Any  # tree like params, state_dtype: g at the last
  #   snapshot (memory="full"), else ()
  window: Any  # tree like params, float32: x_t - x_snapshot (only when
  #   update_gap > 1, weight_decay > 0 or momentum > 0 with memory="full")
  momentum: Any  # tree like params, state_dtype: momentum buffer, or ()
  sign_bits: Any  # tree of uint8 (shape[:-1] + (shape[-1] // 8,), or
  #   (ceil(size/8),) if the last axis is not a multiple of 8): s_{t-1} > 0,
  #   8 consecutive elements per byte (memory="sign"), else ()
  nonzero_bits: Any  # tree of uint8: s_{t-1} != 0 (memory="sign" and
  #   tie="zero"), else ()


def scale_by_alias(
    distance: str = "gap",
    d0: float = 1e-6,
    f_lower: float = 0.0,
    initial_value: Optional[float] = None,
    eta0: float = 0.0,
    initial_stepsize: float = 1e-6,
    max_stepsize: Optional[float] = None,
    update_gap: int = 1,
    warmup_steps: int = 0,
    warmup_stepsize: Optional[optax.ScalarOrSchedule] = None,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    memory: str = "full",
    tie: str = "zero",
    state_dtype: Any = "float32",
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sign-SGD with the parameter-free ALIAS stepsize; emits the final update.

  At step :math:`t` with gradient :math:`g_t` and snapshot gap :math:`k`
  (:math:`\Delta_t = x_t - x_{t-k}`, the transformation's own past outputs):

  .. math::
    \hat L_t = \frac{\|g_t - g_{t-k}\|_1}{\|\Delta_t\|_\infty},\quad
    \eta_t = \eta_{t-1} + \hat L_t,\quad
    \tilde d_t = \tilde d_{t-1} - \langle g_t, \Delta_t\rangle,\quad
    d_t = \max(d_{t-1}, \tilde d_t),

  :math:`D_t = d_t` (``distance="gap"``) or :math:`f(x_0) - \tilde f`
  (``"lower_bound"``), :math:`\gamma_t = \min(\sqrt{D_t/\eta_t},
  \gamma_{\max})` and

  .. math::
    u_t = -\gamma_t\big(\operatorname{tsign}(g_t) + \lambda x_t\big).

  Statistics are sampled and :math:`\gamma` recomputed every ``update_gap``
  steps after ``warmup_steps`` steps of plain Sign-SGD at
  ``warmup_stepsize``; :math:`\gamma` is held in between. A zero iterate
  difference skips the sample, :math:`\eta = 0` gives ``initial_stepsize``, and
  :math:`f(x_0) \le \tilde f` gives :math:`\gamma = 0` (``f_lower`` must lie
  below the attainable loss), so no NaN or inf ever reaches the parameters.

  It must be the **last** element of a chain (it includes the minus sign and
  uses its own previous outputs as iterate differences); whatever precedes it
  (e.g. ``optax.clip_by_global_norm``) defines the gradient of the statistics.

  ``memory="sign"`` keeps only the packed applied direction (1 bit per
  parameter with ``tie="positive"``/``"negative"``, 2 with ``tie="zero"``) and
  replaces the numerator by the secant
  :math:`\max(0, (A + \langle g_t, u_{t-1}\rangle)/U^2)` with
  :math:`A = -\langle g_{t-1}, u_{t-1}\rangle`, :math:`U = \|u_{t-1}\|_\infty`.

  Extra arguments of ``update``: ``value`` (the loss; needed on every call for
  ``distance="lower_bound"`` without ``initial_value``, only the first is
  used), ``prev_grads`` (same-batch estimator: the current batch's gradient
  at :math:`x_{t-k}`, see :func:`alias_previous_params`; replaces the stored
  gradient in the numerator), and ``params`` (needed for weight decay).

  Args:
    distance: ``"gap"`` (Option I) or ``"lower_bound"`` (Option II).
    d0: Option I floor of the distance estimate, > 0.
    f_lower: Option II lower bound of the loss.
    initial_value: Option II :math:`f(x_0)`; if None it is taken from the
      first ``value=``.
    eta0: initial smoothness accumulator, >= 0.
    initial_stepsize: stepsize used at a recompute while :math:`\eta = 0`.
    max_stepsize: optional cap on :math:`\gamma`.
    update_gap: :math:`k \ge 1`; must be 1 for ``memory="sign"``.
    warmup_steps: steps of plain Sign-SGD before ALIAS starts.
    warmup_stepsize: scalar or schedule of the step count; required when
      ``warmup_steps > 0``.
    weight_decay: decoupled decay :math:`\lambda \ge 0`, scaled by
      :math:`\gamma_t` (needs ``params``).
    momentum: :math:`0 \le \mu < 1`: the direction is the sign of the buffer
      :math:`m_t = \mu m_{t-1} + g_t` (:math:`m_0 = g_0`); the statistics stay
      on raw gradients. Decides whether a buffer exists: pass a Python number.
    nesterov: use :math:`\operatorname{tsign}(g_t + \mu m_t)`.
    memory: ``"full"`` or ``"sign"``.
    tie: tie policy of the sign (see :func:`optax_sign.tie_sign`).
    state_dtype: dtype of the gradient snapshot and momentum buffer.
    axis_name: optional named axis of workers. The direction is then the
      majority vote of the workers' directions and every worker computes the
      same stepsize from one ``pmean`` of a few scalars (spec section 7).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose updates come out in the
    gradient's dtype.

  Example:
    >>> tx = scale_by_alias()                       # Option I, no tuning
    >>> tx = scale_by_alias("lower_bound", f_lower=0.0)
    >>> # updates, state = tx.update(grads, state, params, value=loss)

  References:
    Medyakov et al., "Sign-SGD is the Golden Gate between Multi-Node to
    Single-Node Learning: Significant Boost via Parameter-Free Optimization",
    arXiv 2506.03725.
  """
  _checks.check_choice("distance", distance, DISTANCES)
  _checks.check_choice("memory", memory, MEMORIES)
  _checks.check_tie(tie)
  _checks.check_positive("d0", d0)
  _checks.check_real("f_lower", f_lower)
  if initial_value is not None:
    _checks.check_real("initial_value", initial_value)
  _checks.check_nonnegative("eta0", eta0)
  _checks.check_positive("initial_stepsize", initial_stepsize)
  if max_stepsize is not None:
    _checks.check_positive("max_stepsize", max_stepsize)
  _checks.check_int("update_gap", update_gap, 1)
  _checks.check_int("warmup_steps", warmup_steps, 0)
  _check_warmup(warmup_steps, warmup_stepsize)
  _checks.check_nonnegative("weight_decay", weight_decay)
  _checks.check_interval("momentum", momentum, 0.0, 1.0, high_open=True)
  _checks.check_bool("nesterov", nesterov)
  if memory == "sign" and _concrete_int(update_gap) not in (1, None):
    raise ValueError("memory='sign' requires update_gap=1 (a window of several "
                     f"steps is not representable in bits), got {update_gap}")
  state_dtype = _checks.check_float_dtype("state_dtype", state_dtype)

  # Structure (which buffers exist, which terms are reduced) follows Python
  # values only; an array (optax.inject_hyperparams) takes the general path.
  k = update_gap
  full = memory == "full"
  gap_one = not full or _checks.static_int(update_gap) == 1
  has_decay = not _checks.is_static_zero(weight_decay)
  has_momentum = not _checks.is_static_zero(momentum)
  has_window = full and (not gap_one or has_decay or has_momentum)
  # A vote is never the sign of a local gradient: keep it as bits.
  keep_bits = not full or axis_name is not None
  option2 = distance == "lower_bound"
  # The direction is tsign(g_t): ||u_t||_inf follows from ||g_t||_1, no max.
  plain_sign = axis_name is None and not has_momentum and not has_decay

  def init_fn(params):
    zero = jnp.zeros([], _F32)
    bits = jax.tree.map(_zero_bits, params) if keep_bits else ()
    return AliasState(
        count=jnp.zeros([], jnp.int32),
        stepsize=zero,
        smoothness=jnp.asarray(eta0, _F32),
        distance=zero if option2 else jnp.asarray(d0, _F32),
        d_tilde=zero,
        f_diff=zero,
        last_update_norm=zero,
        last_inner=zero,
        grad_snapshot=(optax.tree.zeros_like(params, dtype=state_dtype)
                       if full else ()),
        window=optax.tree.zeros_like(params, dtype=_F32) if has_window else (),
        momentum=(optax.tree.zeros_like(params, dtype=state_dtype)
                  if has_momentum else ()),
        sign_bits=bits,  # separate buffers: states may be donated
        nonzero_bits=(jax.tree.map(_zero_bits, params)
                      if keep_bits and tie == "zero" else ()))

  def update_fn(updates, state, params=None, **extra_args):
    if has_decay and params is None:
      raise ValueError("scale_by_alias with weight_decay > 0 needs params: "
                       "call update(grads, state, params)")
    _checks.warn_misspelled(extra_args)
    prev_grads = extra_args.get("prev_grads")
    t = state.count
    gamma_prev = state.stepsize
    sample = (t > warmup_steps) & (t % k == 0)
    secant = not full and prev_grads is None
    if option2:
      if initial_value is not None:
        f0 = jnp.asarray(initial_value, _F32)
      elif extra_args.get("value") is None:
        raise ValueError(
            "scale_by_alias(distance='lower_bound') needs the loss: pass "
            "value=loss to update (only the first call's value is used) or "
            "set initial_value= at construction")
      else:
        f0 = _scalar_loss(extra_args["value"])
    else:
      f0 = jnp.zeros([], _F32)

    # Direction s_t: sign of the gradient, of the momentum buffer, or the
    # workers' vote (then passed in as `signs`, to vote only once).
    def directions(grads, params, old_momentum, signs=None):
      g32 = optax.tree.cast(grads, _F32)
      x32 = optax.tree.cast(params, _F32) if has_decay else None
      source, new_momentum = g32, old_momentum
      if has_momentum:
        new_momentum = jax.tree.map(
            lambda g, m: jnp.where(t == 0, g, momentum * m.astype(_F32) + g),
            g32, old_momentum)
        source = new_momentum
        if nesterov:
          source = jax.tree.map(lambda g, m: g + momentum * m, g32,
                                new_momentum)
      if signs is None and axis_name is None:
        signs = jax.tree.map(lambda v: _sign.tie_sign(v, tie), source)
      elif signs is None:
        signs = optax.tree.cast(
            _communication.vote_signs(source, axis_name, tie=tie), _F32)
      direction = signs
      if has_decay:
        direction = jax.tree.map(lambda s, x: s + weight_decay * x, signs, x32)
      return g32, x32, new_momentum, signs, direction

    g32, x32, _, signs, direction = directions(updates, params, state.momentum)
    num_params = sum(x.size for x in jax.tree.leaves(updates))

    # Previous applied direction and its iterate difference Delta.
    if keep_bits:
      s_prev = _unpack_signs(state.sign_bits, state.nonzero_bits, updates)
    elif not has_window:
      s_prev = jax.tree.map(lambda g: _sign.tie_sign(g.astype(_F32), tie),
                            state.grad_snapshot)
    if has_window:
      delta = state.window
    elif has_decay:  # sign memory with decay: rebuild u_{t-1} from x_t.
      shrink = 1.0 - gamma_prev * weight_decay
      shrink = jnp.where(shrink > 0, shrink, 1.0)
      delta = jax.tree.map(
          lambda s, x: -gamma_prev * (s + weight_decay * x) / shrink,
          s_prev, x32)
    else:
      delta = jax.tree.map(lambda s: -gamma_prev * s, s_prev)

    # All local scalars in one pass; those of the gradient are averaged over
    # workers in one pmean.
    ref = prev_grads if prev_grads is not None else state.grad_snapshot
    mult = lambda a, b: jax.tree.map(jnp.multiply, a, b)
    terms = {}
    if secant or not option2:
      terms["g_delta"] = ("sum", mult(g32, delta))
    if prev_grads is not None or full:
      terms["num"] = ("sum", jax.tree.map(
          lambda g, p: jnp.abs(g - p.astype(_F32)), g32, ref))
    if secant or plain_sign:
      terms["g_s"] = ("sum", mult(g32, signs))
    if not plain_sign:
      terms["u_inf"] = ("max", jax.tree.map(jnp.abs, direction))
    if secant and has_decay:
      terms["g_x"] = ("sum", mult(g32, x32))
    if not gap_one:
      terms["den"] = ("max", jax.tree.map(jnp.abs, delta))
    stats = dict(zip(terms, _global_reduce(
        list(terms.values()), _communication.axis_names(axis_name))))
    if axis_name is not None:
      # The maxima read only voted (shared) values, but the fused reduction
      # types them as per worker; one exact scalar pmax makes them shared.
      maxima = [m for m in ("u_inf", "den") if m in stats]
      shared = jax.lax.pmax(jnp.stack([stats[m] for m in maxima]), axis_name)
      stats.update(zip(maxima, jnp.unstack(shared)))
    if plain_sign:  # ||s_t||_inf from <g_t, tsign(g_t)> = ||g_t||_1.
      moved = stats["g_s"] > 0 if tie == "zero" else num_params > 0
      stats["u_inf"] = jnp.where(jnp.isnan(stats["g_s"]), jnp.nan,
                                 jnp.where(moved, 1.0, 0.0))
    # The new state is built from inputs tied to the scalars by a product with
    # one (NaN if the direction has a NaN: the update is NaN then anyway), so
    # XLA updates the donated state buffers in place after the reduction has
    # read them instead of copying them first.
    one = jnp.where(jnp.isnan(stats["u_inf"]), jnp.nan, 1.0)
    updates, params, old_momentum, voted = jax.tree.map(
        lambda x: x * one.astype(x.dtype),
        (updates, params if has_decay else None, state.momentum,
         None if axis_name is None else signs))
    g32, x32, new_momentum, signs, direction = directions(
        updates, params, old_momentum, voted)
    zero = jnp.zeros([], _F32)
    g_delta, num, f0, g_s, g_x = jnp.unstack(_pmean(jnp.stack(
        [stats.get("g_delta", zero), stats.get("num", zero), f0,
         stats["g_s"] if secant else zero, stats.get("g_x", zero)]),
        axis_name))

    # 1. Option II distance from the first loss.
    f_diff = jnp.where(t == 0, jnp.maximum(f0 - f_lower, 0.0), state.f_diff)

    # 2. Smoothness sample and distance increment.
    den = state.last_update_norm if gap_one else stats["den"]
    if not secant:
      l_hat = num / jnp.where(den > 0, den, 1.0)
    else:
      l_hat = jnp.maximum(
          (state.last_inner + g_delta) / jnp.where(den > 0, den * den, 1.0), 0.)
    ok = sample & (den > 0) & jnp.isfinite(l_hat)
    eta = state.smoothness + jnp.where(ok, l_hat, 0.0)
    d_tilde = state.d_tilde + jnp.where(sample & (not option2), -g_delta, 0.0)

    # 3. Stepsize.
    recompute = (t == warmup_steps) | sample
    dist = f_diff if option2 else jnp.maximum(state.distance, d_tilde)
    gamma = jnp.where(eta > 0, jnp.sqrt(dist / jnp.where(eta > 0, eta, 1.0)),
                      jnp.asarray(initial_stepsize, _F32))
    if max_stepsize is not None:
      gamma = jnp.minimum(gamma, max_stepsize)
    gamma = jnp.where(recompute, gamma, gamma_prev)
    dist = jnp.where(recompute, dist, state.distance)
    if warmup_stepsize is not None:
      warm = (warmup_stepsize(t) if callable(warmup_stepsize)
              else warmup_stepsize)
      gamma = jnp.where(t < warmup_steps, jnp.asarray(warm, _F32), gamma)
    gamma = gamma.astype(_F32)

    # 4-5. Update u_t = -gamma (s_t + wd x_t). With stored bits the update
    # reads the new bits instead of the gradient; a NaN direction then makes
    # the whole update NaN (it is never hidden).
    sign_bits, nonzero_bits = state.sign_bits, state.nonzero_bits
    if keep_bits:
      sign_bits, nonzero_bits = _pack_signs(signs, tie)
      applied = _unpack_signs(sign_bits, nonzero_bits, updates)
      if has_decay:
        applied = jax.tree.map(lambda s, x: s + weight_decay * x, applied,
                               x32)
      scale = jnp.where(jnp.isnan(stats["u_inf"]), jnp.nan, gamma)
    else:
      applied, scale = direction, gamma
    u32 = jax.tree.map(lambda s: -scale * s, applied)
    u_norm = gamma * stats["u_inf"]
    new_updates = jax.tree.map(lambda u, g: u.astype(g.dtype), u32, updates)

    # 6. Bookkeeping.
    snap = t % k == 0
    grad_snapshot = state.grad_snapshot
    if full and gap_one:
      grad_snapshot = _sign.cast_like(updates, state.grad_snapshot)
    elif full:
      grad_snapshot = jax.tree.map(
          lambda g, old: jnp.where(snap, g.astype(old.dtype), old),
          updates, state.grad_snapshot)
    window = state.window
    if has_window:
      window = jax.tree.map(lambda w, u: jnp.where(snap, 0.0, w) + u,
                            state.window, u32)
    last_inner = gamma * (g_s + weight_decay * g_x if has_decay else g_s)
    new_state = AliasState(
        count=optax.safe_increment(t),
        stepsize=gamma,
        smoothness=eta.astype(_F32),
        distance=dist.astype(_F32),
        d_tilde=d_tilde.astype(_F32),
        f_diff=f_diff.astype(_F32),
        last_update_norm=u_norm.astype(_F32),
        last_inner=last_inner.astype(_F32),
        grad_snapshot=grad_snapshot,
        window=window,
        momentum=(_sign.cast_like(new_momentum, state.momentum)
                  if has_momentum else ()),
        sign_bits=sign_bits,
        nonzero_bits=nonzero_bits)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_alias_state(state: Any) -> AliasState:
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, AliasState))
           if isinstance(s, AliasState)]
  if len(found) != 1:
    raise ValueError("expected exactly one AliasState in the optimizer state, "
                     f"found {len(found)}")
  return found[0]


def alias_previous_params(params: optax.Params,
                          state: optax.OptState,
                          weight_decay: float = 0.0,
                          tie: str = "zero") -> optax.Params:
  r"""The iterate :math:`x_{t-k}` for the same-batch estimator.

  Returns :math:`x_t - (x_t - x_{t-k})`: the stored window when there is one,
  otherwise :math:`x_t - u_{t-1}` rebuilt from the stored direction. Evaluate
  the current batch's gradient there and pass it as ``prev_grads=``. Flax NNX
  trees are accepted as they are (``nnx.state(model, nnx.Param)`` and
  ``optimizer.opt_state``); the result has the structure of ``params``.

  Args:
    params: the current parameters :math:`x_t`.
    state: the optimizer state (any state containing one :class:`AliasState`).
    weight_decay: the transformation's ``weight_decay`` (needed only for the
      rebuild with ``memory="sign"``).
    tie: the transformation's ``tie`` (needed only for ``memory="full"``
      without a window).

  Returns:
    A tree like ``params``.

  Example:
    >>> # prev = alias_previous_params(params, opt_state)
    >>> # prev_grads = jax.grad(loss)(prev, batch)
    >>> # updates, opt_state = tx.update(grads, opt_state, params,
    >>> #                                prev_grads=prev_grads)
  """
  s = _find_alias_state(state)
  # Leaves in order, so that wrapped trees (Flax NNX ``Param`` parameters and
  # ``OptVariable`` states) combine as they are.
  x, treedef = jax.tree.flatten(params)
  gamma = jax.tree.leaves(s.stepsize)[0]
  if not _absent(s.window):
    return jax.tree.unflatten(treedef, [(xi - w).astype(xi.dtype) for xi, w in
                              zip(x, jax.tree.leaves(s.window))])
  if not _absent(s.sign_bits):  # x_t - u_{t-1}, u_{t-1} as in the update.
    nonzero = (() if _absent(s.nonzero_bits)
               else jax.tree.leaves(s.nonzero_bits))
    signs = _unpack_signs(jax.tree.leaves(s.sign_bits), nonzero, x)
    shrink = 1.0 - gamma * weight_decay
    shrink = jnp.where(shrink > 0, shrink, 1.0)
    return jax.tree.unflatten(treedef, [
        (xi.astype(_F32) + gamma * (d + weight_decay * xi.astype(_F32))
         / shrink).astype(xi.dtype) for xi, d in zip(x, signs)])
  return jax.tree.unflatten(treedef, [
      (xi.astype(_F32) + gamma * _sign.tie_sign(g.astype(_F32), tie)).astype(
          xi.dtype) for xi, g in zip(x, jax.tree.leaves(s.grad_snapshot))])


# ----------------------------------------------------------------------------
# Momentum / Adam-style ALIAS (experimental).


class AliasMomentumState(NamedTuple):
  """State of :func:`scale_by_alias_momentum` (``distance`` is the one to log)."""
  count: jax.Array  # type: ignore[assignment]  # int32 scalar
  distance: Any  # float32 scalar d (a tree of per-leaf scalars if per_tensor)
  running: Any  # float32 scalar r (likewise)
  mu: optax.Updates  # tree like params, state_dtype: first moment m
  nu: optax.Updates  # tree like params, state_dtype: second moment v
  prev_grad: Any  # tree like params, state_dtype, for dot="abs_abs"; else ()
  sign_bits: Any  # tree of packed uint8: g_{t-1} > 0, for dot="sign_inner"
  nonzero_bits: Any  # tree of packed uint8: g_{t-1} != 0, for "sign_inner"


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

  def scalars(params, value):
    if per_tensor:
      return jax.tree.map(lambda _: jnp.asarray(value, _F32), params)
    return jnp.asarray(value, _F32)

  def init_fn(params):
    bits = jax.tree.map(_zero_bits, params) if dot == "sign_inner" else ()
    return AliasMomentumState(
        count=jnp.zeros([], jnp.int32),
        distance=scalars(params, d0),
        running=scalars(params, r0),
        mu=optax.tree.zeros_like(params, dtype=state_dtype),
        nu=optax.tree.zeros_like(params, dtype=state_dtype),
        prev_grad=(optax.tree.zeros_like(params, dtype=state_dtype)
                   if dot == "abs_abs" else ()),
        sign_bits=bits if dot == "sign_inner" else (),
        nonzero_bits=(jax.tree.map(_zero_bits, params)
                      if dot == "sign_inner" else ()))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if has_decay and params is None:
      raise ValueError("scale_by_alias_momentum with weight_decay > 0 needs "
                       "params: call update(grads, state, params)")
    t = state.count
    if dot == "sign_inner":
      prev = _unpack_signs(state.sign_bits, state.nonzero_bits, updates)
      c = jax.tree.map(lambda g, s: jnp.sum(g.astype(_F32) * s), updates, prev)
    else:
      c = jax.tree.map(
          lambda g, p: jnp.sum(jnp.abs(g.astype(_F32)) * jnp.abs(
              p.astype(_F32))), updates, state.prev_grad)
    if not per_tensor:
      c = sum(jax.tree.leaves(c), jnp.zeros([], _F32))
    rb2 = b2 ** 0.5
    running = jax.tree.map(
        lambda r, d, ci: jnp.where(t > 0, rb2 * r + (1 - rb2) * d * ci, r),
        state.running, state.distance, c)
    dist = jax.tree.map(jnp.maximum, state.distance, running)
    d_tree = (dist if per_tensor
              else jax.tree.map(lambda _: dist, updates))
    mu = jax.tree.map(
        lambda g, m, d: b1 * m.astype(_F32) + (1 - b1) * d * g.astype(_F32),
        updates, state.mu, d_tree)
    nu = jax.tree.map(
        lambda g, v, d: b2 * v.astype(_F32)
        + (1 - b2) * jnp.square(d * g.astype(_F32)), updates, state.nu, d_tree)
    if direction == "sign_snr":
      dirs = jax.tree.map(
          lambda m, v, d: d * jnp.sqrt((m * m + eps) / (v + eps)) * jnp.sign(m),
          mu, nu, d_tree)
    else:
      dirs = jax.tree.map(lambda m, v, d: d * m / (jnp.sqrt(v) + eps),
                          mu, nu, d_tree)
    if has_decay:
      dirs = jax.tree.map(lambda u, x: u + weight_decay * x.astype(_F32),
                          dirs, params)
    lr = learning_rate(t) if callable(learning_rate) else learning_rate
    new_updates = jax.tree.map(lambda u, g: (-lr * u).astype(g.dtype),
                               dirs, updates)
    sign_bits, nonzero_bits = state.sign_bits, state.nonzero_bits
    if dot == "sign_inner":
      sign_bits, nonzero_bits = _pack_signs(updates, "zero")
    return new_updates, AliasMomentumState(
        count=optax.safe_increment(t),
        distance=dist,
        running=running,
        mu=_sign.cast_like(mu, state.mu),
        nu=_sign.cast_like(nu, state.nu),
        prev_grad=(_sign.cast_like(updates, state.prev_grad)
                   if dot == "abs_abs" else ()),
        sign_bits=sign_bits,
        nonzero_bits=nonzero_bits)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
