"""Local steps with a global outer step (DSM-LS, DiLoCo, SlowMo, averaging).

Every worker applies an inner optax optimizer on every step without
communicating. Every ``sync_every`` steps the workers' models are averaged
once (one full-precision all-reduce of the parameters), an outer optax
transformation is applied to the pseudo-gradient at the anchor (the model at
the start of the round), and every worker jumps to the new anchor.
"""

from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from optax_sign import _checks
from optax_sign import _communication

AxisName = Union[str, Sequence[str], None]
PSEUDO_GRAD_SCALES = ("inner_lr", "none")


class LocalStepsState(NamedTuple):
  """State of :func:`local_steps`.

  Under ``shard_map`` ``count``, ``anchor`` and ``outer_state`` are replicated
  (device-invariant, spec ``P()``); ``inner_state`` is per worker (spec
  ``P(axis)`` on a stacked leading worker axis). Checkpoints hold all of it.
  """
  count: jax.Array  # type: ignore[assignment]  # int32: local steps so far
  anchor: optax.Params  # tree like params, float32 (float64 for float64
  #   params): the anchor x_{t,0}, the parameters to evaluate (replicated)
  inner_state: optax.OptState  # state of the inner optimizer (per worker)
  outer_state: optax.OptState  # state of the outer transformation (replicated)


def _varying_axes(x: Any) -> frozenset:
  """The mesh axes over which ``x`` is device-varying (empty outside shard_map)."""
  return frozenset(_communication.varying_axes(x))


def _vary(x: Any, axes: frozenset) -> Any:
  """Marks ``x`` device-varying over ``axes`` it is not yet varying over."""
  missing = tuple(sorted(axes - _varying_axes(x)))
  if not missing:
    return x
  return jax.lax.pcast(x, missing, to="varying")


def _vary_like(tree: Any, like: Any) -> Any:
  """Casts every leaf of ``tree`` to vary over the axes of ``like``'s leaf."""
  return jax.tree.map(lambda x, y: _vary(x, _varying_axes(y)), tree, like)


def _anchor_leaf(p: Any) -> Any:
  """A float32 (or wider) copy of a parameter; abstract for abstract input."""
  dtype = jnp.promote_types(p.dtype, jnp.float32)
  if isinstance(p, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(p.shape, dtype, sharding=p.sharding)
  return jnp.asarray(p, dtype)


def local_steps(
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    sync_every: int = 12,
    axis_name: AxisName = None,
    pseudo_grad_scale: str = "inner_lr",
    inner_learning_rate: Optional[optax.ScalarOrSchedule] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on every step and ``outer`` on the averaged model every ``sync_every`` steps.

  With anchor :math:`x_{t,0}` (captured at ``init``), local step counter
  ``count`` and :math:`\tau` = ``sync_every``, every call computes the worker's
  inner step :math:`x' = x + \mathrm{inner}(g)`. On steps with
  :math:`(\mathrm{count} + 1) \bmod \tau = 0`:

  .. math::
    \bar x = \tfrac1N \textstyle\sum_i x'_i,\qquad
    g_t = (x_{t,0} - \bar x) / \gamma_t \ (\text{"inner\_lr"})
    \ \text{or}\ x_{t,0} - \bar x \ (\text{"none"}),\\
    x_{t+1,0} = x_{t,0} + c_t\,\mathrm{outer}(g_t;\ \text{params}=x_{t,0}),
    \quad c_t = \gamma_t \text{ or } 1,

  and the emitted update moves the worker to :math:`x_{t+1,0}`; otherwise the
  emitted update is the inner update. :math:`\gamma_t` is
  ``inner_learning_rate`` at the current ``count``. The pseudo-gradient has the
  sign of a gradient, so ``outer`` is an ordinary descent optimizer. If
  :math:`\gamma_t \le 0` the round makes no outer step (anchor and outer state
  stay, the workers return to the anchor) and no NaN is formed.

  The average is a ``pmean`` over ``axis_name`` in float32 (one fp32
  all-reduce of the parameters), run on sync steps only, as a
  ``lax.while_loop`` of zero or one iteration on the replicated counter: the
  other steps run no collective at all, and XLA updates the loop's carried
  anchor, outer state and update in place (a ``lax.cond`` copied them on
  every step, and made a non-sync step cost 7.6 AdamW steps instead of 2.4).
  (A while loop is not reverse-differentiable, so neither is the update.) To make a
  non-sync step cost what the inner optimizer costs, pass the extra argument
  ``sync=`` as a Python
  bool and jit two steps chosen on the host (``sync=(i + 1) % sync_every ==
  0``): then no loop is built and the counter only counts. With the extra argument
  ``alive=`` (this worker's flag or a replicated ``(N,)`` mask, read on sync
  steps) the average is over the live workers only, every worker (a dead one
  too) moves to the new anchor, and with no live worker the round makes no
  outer step. A worker whose parameters or inner state went non-finite
  cannot be moved back by an added update: restart it from
  :func:`local_steps_anchor` (and a fresh inner state). The inner state is never
  averaged or reset. The wrapper must be the outermost transformation (nothing
  may rescale its updates) and ``update`` needs ``params``. Evaluate
  :func:`local_steps_anchor` (the anchor); after a sync the local parameters
  equal it to within one rounding of ``params + (anchor - params)``.

  Every worker must initialise the state from the same parameters (see
  :func:`broadcast_params`); local parameters may still differ at start, the
  first sync moves every worker to the common anchor. Under ``shard_map`` keep
  ``count``, ``anchor`` and ``outer_state`` replicated and mark the local
  parameters device-varying (``jax.lax.pcast(p, axis, to="varying")`` or a
  per-worker ``in_specs``), or ``jax.grad`` silently all-reduces gradients on
  every step.

  Args:
    inner: any optax optimizer, applied per worker on every step (include its
      learning rate; updates are added to the parameters).
    outer: an optax transformation fed the pseudo-gradient with ``params`` set
      to the anchor; its updates are added to the anchor (after the
      multiplication by :math:`\gamma_t` for ``"inner_lr"``).
    sync_every: the sync interval :math:`\tau \ge 1`.
    axis_name: mapped axis name (or tuple) of the workers; ``None`` for one
      worker and no collective.
    pseudo_grad_scale: ``"inner_lr"`` divides the model difference by
      :math:`\gamma_t` and multiplies the outer update by it (DSM-LS, SlowMo);
      ``"none"`` feeds the raw difference (DiLoCo, averaging).
    inner_learning_rate: scalar or schedule of the local step count, the same
      one the inner optimizer uses; required for ``"inner_lr"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`LocalStepsState`.

  Example:
    >>> lr = 1e-3
    >>> tx = local_steps(optax.adam(lr), global_sign_momentum(), sync_every=12,
    ...                  axis_name="x", inner_learning_rate=lr)

    A complete run over 4 workers is in the example of
    :func:`local_steps_vmap_state`.

  References:
    Yu et al., "Distributed Sign Momentum with Local Steps for Training
    Transformers", arXiv 2411.17866; Douillard et al., "DiLoCo", arXiv
    2311.08105; Wang et al., "SlowMo", arXiv 1910.00643.
  """
  _checks.check_int("sync_every", sync_every, 1)
  _checks.check_choice("pseudo_grad_scale", pseudo_grad_scale,
                       PSEUDO_GRAD_SCALES)
  scaled = pseudo_grad_scale == "inner_lr"
  if scaled and inner_learning_rate is None:
    raise ValueError(
        'pseudo_grad_scale="inner_lr" needs inner_learning_rate (the scalar or '
        'schedule the inner optimizer uses); pass it or use '
        'pseudo_grad_scale="none"')
  if scaled and not callable(inner_learning_rate):
    _checks.check_nonnegative("inner_learning_rate", inner_learning_rate)

  def init_fn(params):
    _checks.check_float_params(params)
    # Abstract parameters (jax.ShapeDtypeStruct) give an abstract anchor.
    anchor = jax.tree.map(_anchor_leaf, params)
    return LocalStepsState(
        count=jnp.zeros([], jnp.int32),
        anchor=anchor,
        inner_state=inner.init(params),
        outer_state=outer.init(anchor))

  scaled_lr = inner_learning_rate if scaled else None

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "local_steps needs the current parameters: call "
          "update(grads, state, params)")
    _communication.axis_size(axis_name)  # a clear error if it is not bound
    _checks.warn_misspelled(extra_args)
    inner_updates, inner_state = inner.update(
        updates, state.inner_state, params, **extra_args)
    emitted_axes = jax.tree.map(
        lambda u, p: _varying_axes(u) | _varying_axes(p), inner_updates, params)
    count = state.count

    def on_sync(operands):  # (anchor, outer state, update) after a sync
      anchor, outer_state, inner_updates = operands
      local_new = optax.apply_updates(params, inner_updates)
      avg, any_live = _average(local_new, anchor, axis_name,
                               extra_args.get("alive"))
      new_anchor, new_outer = _outer_step(outer, scaled_lr, count, avg,
                                          anchor, outer_state)
      if any_live is not None:  # no live worker: back to the anchor
        new_anchor = optax.tree.where(any_live, new_anchor, anchor)
        new_outer = optax.tree.where(any_live, new_outer, outer_state)
      emitted = jax.tree.map(  # the update that moves the worker there
          lambda a, p, u, ax: _vary((a - p.astype(a.dtype)).astype(u.dtype),
                                    ax),
          new_anchor, params, inner_updates, emitted_axes)
      return (_vary_like(new_anchor, anchor),
              _vary_like(new_outer, outer_state), emitted)

    local = jax.tree.map(_vary, inner_updates, emitted_axes)
    operands = (state.anchor, state.outer_state, local)
    sync = extra_args.get("sync")
    if sync is None:
      anchor, outer_state, emitted = _run_if(
          (count + 1) % sync_every == 0, on_sync, operands)
    else:  # chosen on the host: no loop
      _checks.check_bool("sync", sync)
      anchor, outer_state, emitted = on_sync(operands) if sync else operands
    new_state = LocalStepsState(
        count=optax.safe_increment(count),
        anchor=anchor,
        inner_state=inner_state,
        outer_state=outer_state)
    return emitted, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _run_if(pred: jax.Array, fn: Any, operands: Any) -> Any:
  """``fn(operands)`` if ``pred`` else ``operands``, as a loop of zero or one
  iteration: XLA updates a loop's carried buffers in place, where
  ``lax.cond`` copies the operands it passes through on every call."""
  def body(carry):
    _, operands = carry
    return jnp.zeros_like(pred), fn(operands)
  return jax.lax.while_loop(lambda carry: carry[0], body, (pred, operands))[1]


def _average(local_new: Any, anchor: Any, axis_name: AxisName,
             alive: Any) -> Tuple[Any, Optional[jax.Array]]:
  """The workers' mean model in the anchor's dtypes, over the live ones with
  ``alive=`` (then also whether any worker is alive)."""
  avg = jax.tree.map(lambda x, a: x.astype(a.dtype), local_new, anchor)
  if axis_name is None:
    return avg, None
  n = _communication.axis_size(axis_name)
  alive, own = _communication.alive_flags(alive, axis_name, n)
  if alive is None or own is None:
    return jax.lax.pmean(avg, axis_name), None
  live = _communication.live_workers(axis_name, n, alive, own)
  total = jax.lax.psum(jax.tree.map(
      lambda x: jnp.where(own, x, jnp.zeros_like(x)), avg), axis_name)
  return jax.tree.map(lambda x: x / jnp.maximum(live, 1).astype(x.dtype),
                      total), live > 0


def _outer_step(outer: optax.GradientTransformation,
                inner_learning_rate: Optional[optax.ScalarOrSchedule],
                count: jax.Array, avg: Any, anchor: Any,
                outer_state: Any) -> Tuple[Any, Any]:
  """The new anchor and outer state from the averaged model; with
  ``inner_learning_rate`` (``"inner_lr"`` scaling) the pseudo-gradient is
  divided by gamma_t and the outer update multiplied by it (no step for
  gamma_t <= 0)."""
  delta = optax.tree.sub(anchor, avg)
  if inner_learning_rate is None:
    step, new_outer = outer.update(delta, outer_state, anchor)
    new_anchor = jax.tree.map(lambda a, u: (a + u).astype(a.dtype),
                              anchor, step)
    return new_anchor, new_outer
  gamma = (inner_learning_rate(count) if callable(inner_learning_rate)
           else inner_learning_rate)
  gamma = jnp.asarray(gamma)
  active = gamma > 0
  safe_gamma = jnp.where(active, gamma, 1.0)
  pseudo_grad = jax.tree.map(lambda d: d / safe_gamma.astype(d.dtype), delta)
  step, new_outer = outer.update(pseudo_grad, outer_state, anchor)
  new_anchor = jax.tree.map(
      lambda a, u: jnp.where(active, a + safe_gamma.astype(a.dtype) * u,
                             a).astype(a.dtype), anchor, step)
  return new_anchor, optax.tree.where(active, new_outer, outer_state)


def local_steps_anchor(state: optax.OptState) -> optax.Params:
  """The parameters to evaluate: the anchor of a :func:`local_steps` state.

  Args:
    state: a :class:`LocalStepsState`, or any optimizer state containing
      exactly one (e.g. under ``optax.inject_hyperparams`` or ``MultiSteps``).

  Returns:
    The anchor :math:`x_{t,0}` (float32 tree like the parameters). At a round
    boundary it is the global model, bitwise identical on every worker.

  Example:
    >>> tx = local_steps(optax.sgd(1e-2), optax.sgd(1.0), sync_every=4,
    ...                  inner_learning_rate=1e-2)
    >>> opt_state = tx.init(params)
    >>> eval_params = local_steps_anchor(opt_state)
    >>> jax.tree.map(jnp.shape, eval_params)
    {'b': (2,), 'w': (3, 2)}
  """
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, LocalStepsState))
           if isinstance(s, LocalStepsState)]
  if len(found) != 1:
    raise ValueError(
        "local_steps_anchor expects a state holding exactly one "
        f"LocalStepsState, found {len(found)}")
  return found[0].anchor


def local_steps_vmap_state(
    state: LocalStepsState,
    num_workers: int) -> Tuple[LocalStepsState, LocalStepsState]:
  r"""A :func:`local_steps` state for ``jax.vmap`` over workers, and its axes.

  The inner state is repeated along a new leading axis of size
  ``num_workers``; the counter, anchor and outer state stay unbatched. Pass
  the returned axes as the state's ``in_axes`` and ``out_axes``: the sync
  condition then stays a scalar and the sync loop runs only on sync steps. A
  batched counter (``jax.vmap(tx.init)``) turns the loop's predicate into a
  batched one, whose body (and average) runs every step under a ``select``.
  With ``vmap(..., spmd_axis_name="replica")`` on a mesh the average is one
  all-reduce over ``"replica"``, inside the loop.

  Args:
    state: ``tx.init(params)`` of one worker's parameters.
    num_workers: :math:`N`, the size of the vmapped axis.

  Returns:
    ``(state, axes)``: the state with a per-worker inner state, and the
    matching ``in_axes``/``out_axes`` prefix (``0`` for the inner state,
    ``None`` elsewhere).

  Example:
    Four workers simulated by a named ``jax.vmap``, each on its own quarter
    of the batch, syncing every 4 steps:

    >>> tx = dsm_ls(inner_learning_rate=1e-2, sync_every=4, axis_name="workers")
    >>> state, axes = local_steps_vmap_state(tx.init(params), 4)
    >>> def step(params, state, batch):
    ...   grads = jax.grad(loss_fn)(params, batch)
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> step = jax.jit(jax.vmap(step, in_axes=(0, axes, 0), out_axes=(0, axes),
    ...                         axis_name="workers"))
    >>> local = jax.tree.map(lambda p: jnp.stack([p] * 4), params)
    >>> shards = jax.tree.map(lambda a: a.reshape(4, -1, *a.shape[1:]), batch)
    >>> for _ in range(8):  # two rounds
    ...   local, state = step(local, state, shards)
    >>> int(state.count), jax.tree.map(jnp.shape, local_steps_anchor(state))
    (8, {'b': (2,), 'w': (3, 2)})
  """
  if not isinstance(state, LocalStepsState):
    raise TypeError("local_steps_vmap_state expects the LocalStepsState of "
                    f"local_steps (or a preset), got {type(state).__name__}")
  _checks.check_int("num_workers", num_workers, 1)
  inner = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (num_workers,) + jnp.shape(x)),
      state.inner_state)
  axes = LocalStepsState(count=None, anchor=None, inner_state=0,  # type: ignore[arg-type]
                         outer_state=None)
  return state._replace(inner_state=inner), axes


def broadcast_params(params: optax.Params, axis_name: AxisName) -> optax.Params:
  r"""Gives every worker the parameters of worker 0 (one all-reduce, once).

  .. math:: p \leftarrow \textstyle\sum_i [\,i = 0\,]\, p_i

  Call it inside ``shard_map``, ``pmap`` or a named ``vmap`` before
  ``local_steps(...).init`` when workers build their models from different
  random keys: the anchor must start equal everywhere. The values are exact
  (the other workers add zeros). Under ``shard_map`` the result is
  device-invariant; mark the local copy varying before taking gradients.

  Args:
    params: the worker's parameters.
    axis_name: the workers' axis name (or tuple of names).

  Returns:
    Worker 0's parameters, in the dtype of ``params``.

  Example:
    >>> keys = jax.random.split(jax.random.key(0), 4)
    >>> w = jax.vmap(lambda k: jax.random.normal(k, (3,)))(keys)  # 4 inits
    >>> same = jax.vmap(lambda p: broadcast_params(p, "x"), axis_name="x")(w)
    >>> bool(jnp.all(same == w[0]))
    True
  """
  if axis_name is None:
    raise ValueError("broadcast_params needs the workers' axis_name")
  first = jax.lax.axis_index(axis_name) == 0
  return jax.lax.psum(
      jax.tree.map(lambda p: jnp.where(first, p, jnp.zeros_like(p)), params),
      axis_name)
