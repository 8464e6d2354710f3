"""ALIAS: the parameter-free stepsize of Sign-SGD, from three parts.

ALIAS sets the Sign-SGD stepsize online as :math:`\\gamma_t = \\sqrt{D_t/\\eta_t}`,
where :math:`\\eta_t` sums local :math:`L_\\infty`-smoothness samples built from
gradient and iterate differences and :math:`D_t` estimates the initial
suboptimality (``docs/algorithms/alias.md``). :func:`scale_by_alias` combines

* a **direction**: the tie-broken sign of the gradient or of a momentum
  buffer, or the workers' majority vote, plus decoupled weight decay;
* a **memory** of the previous step: the gradient snapshot (with a window of
  iterate differences when the step cannot be rebuilt from it), or only the
  packed applied direction (``memory="sign"``);
* an **estimator**: Option I (the gap :math:`d_t`) or Option II (the lower
  bound :math:`f(x_0) - \\tilde f`), with warmup, cap and hold between samples.

Every statistic of a step is a vectorised float32 reduction per leaf, fused
with its elementwise producers (:func:`optax_sign._reduce.global_reduce`;
sums against stored signs read the packed bits,
:func:`optax_sign._bits.signed_sums`) and, across workers, one ``pmean`` of
five scalars.
"""

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence, Union
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sign import _bits
from optax_sign import _checks
from optax_sign import _communication
from optax_sign import _reduce
from optax_sign import _sign

AxisName = Union[str, Sequence[str], None]
DISTANCES = ("gap", "lower_bound")
MEMORIES = ("full", "sign")
_F32 = jnp.float32
_EPS32 = float(jnp.finfo(jnp.float32).eps)
_MAX_DOUBLINGS = 20  # of initial_stepsize while no curvature is measured
_STALL_STEP = 200  # when a stepsize still near its initial value is reported
_stall_warned = False


def _warn_stall(stalled: Any, gamma: Any, initial: Any) -> None:
  """Host side of :meth:`_Alias.check_stall`: warns once per process (under
  ``vmap`` the call comes every step, with the flags of every worker)."""
  global _stall_warned
  if _stall_warned or not np.any(stalled):
    return
  _stall_warned = True
  gamma = float(np.max(gamma))
  warnings.warn(
      f"ALIAS: after {_STALL_STEP} steps the stepsize is {gamma:.3g}, below "
      f"its initial value {float(np.max(initial)):.3g}, so training has "
      "barely moved. On mini-batch gradients the different-batch curvature "
      "sample is mostly noise: use alias_sign_sgd_stochastic() (statistics "
      "20 steps apart, a momentum direction), pass prev_grads= (the "
      "same-batch estimator, see alias_previous_params) or use "
      "distance='lower_bound' with value=; see the 'Mini-batches' section of "
      "docs/algorithms/alias.md.",
      RuntimeWarning, stacklevel=2)
_TIE_CODES = {"zero": 0, "positive": 1, "negative": -1}


# ----------------------------------------------------------------------------
# State.


class GapState(NamedTuple):
  """Option I's accumulator."""
  d_tilde: jax.Array  # float32: sum of -<g_t, x_t - x_{t-k}>


class LowerBoundState(NamedTuple):
  """Option II's distance."""
  f_diff: jax.Array  # float32: max(f(x_0) - f_lower, 0)
  measured: jax.Array  # bool: f(x_0) was taken (the first finite value=)


class GradientMemory(NamedTuple):
  """``memory="full"``: the gradient at the last snapshot."""
  grad: Any  # tree like params, state_dtype: g_{t-k}
  window: Any  # float32 tree x_t - x_{t-k} (needed with k > 1, decay or
  #   momentum), else optax.EmptyState()
  signs: Any  # SignBits of the voted direction (axis_name), else EmptyState
  tie: jax.Array  # int8: the tie policy's value of sign(0) (0, +1 or -1)
  snapshot_step: jax.Array  # int32: t of the last snapshot (-k before any)


class SignMemory(NamedTuple):
  """``memory="sign"``: only the applied direction, packed."""
  signs: _bits.SignBits  # s_{t-1}, 1 bit (2 with tie="zero") per coordinate
  last_inner: jax.Array  # float32: A = -<g_{t-1}, u_{t-1}>
  decay: Any  # per-leaf float32 decay rates (with decay), else EmptyState


class MomentumBuffer(NamedTuple):
  """The direction's momentum buffer ``m_t = mu m_{t-1} + g_t``."""
  momentum: Any  # tree like params, state_dtype


class AliasState(NamedTuple):
  """State of :func:`scale_by_alias`.

  ``stepsize``, ``applied_stepsize`` (times the learning rate),
  ``smoothness`` and ``distance`` are the fields to log, e.g.
  ``optax.tree.get(state, "stepsize")``.
  """
  count: jax.Array  # type: ignore[assignment]  # int32: updates so far (t)
  stepsize: jax.Array  # float32: gamma of the last update (ALIAS's estimate)
  applied_stepsize: jax.Array  # float32: alpha gamma, the step actually taken
  smoothness: jax.Array  # float32: eta, the sum of smoothness samples
  distance: jax.Array  # float32: D (d for "gap", f(x0) - f_lower else)
  last_update_norm: jax.Array  # float32: U = ||u_{t-1}||_inf
  estimator: Union[GapState, LowerBoundState]
  memory: Union[GradientMemory, SignMemory]
  direction: Union[MomentumBuffer, optax.EmptyState]


def _absent(tree: Any) -> bool:
  return isinstance(tree, optax.EmptyState)


def _worker_mean(x: jax.Array, axis_name: AxisName, alive: Any) -> jax.Array:
  """The mean of ``x`` over the workers, over the live ones with ``alive``."""
  if axis_name is None:
    return x
  if alive is None:
    return jax.lax.pmean(x, axis_name)
  n = _communication.axis_size(axis_name)
  alive, own = _communication.alive_flags(alive, axis_name, n)
  assert own is not None
  live = _communication.live_workers(axis_name, n, alive, own)
  total = jax.lax.psum(jnp.where(own, x, jnp.zeros_like(x)), axis_name)
  return total / jnp.maximum(live, 1.0)


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


def _tie_sign_coded(x: jax.Array, code: jax.Array) -> jax.Array:
  """``tie_sign`` with the tie policy given as its value of sign(0)."""
  return jnp.where(x == 0, code.astype(x.dtype), jnp.sign(x))


# ----------------------------------------------------------------------------
# The three parts and their combination.


@dataclasses.dataclass(frozen=True)
class _Alias:
  """One ALIAS configuration: static flags plus the (maybe traced) numbers.

  Which buffers exist and which statistics are reduced follow Python values
  only; an array hyperparameter (``optax.inject_hyperparams``) takes the
  general path.
  """
  option2: bool
  learning_rate: Any
  memory: str
  tie: str
  axis_name: AxisName
  update_gap: Any
  d0: Any
  f_lower: Any
  initial_value: Any
  eta0: Any
  initial_stepsize: Any
  max_stepsize: Any
  warmup_steps: Any
  warmup_stepsize: Any
  weight_decay: Any
  mask: Any
  momentum: Any
  nesterov: bool
  state_dtype: Any

  @property
  def full(self) -> bool:
    return self.memory == "full"

  @property
  def gap_one(self) -> bool:
    return not self.full or _checks.static_int(self.update_gap) == 1

  @property
  def has_decay(self) -> bool:
    return not _checks.is_static_zero(self.weight_decay)

  @property
  def has_momentum(self) -> bool:
    return not _checks.is_static_zero(self.momentum)

  @property
  def has_window(self) -> bool:
    return self.full and (not self.gap_one or self.has_decay
                          or self.has_momentum)

  @property
  def keep_bits(self) -> bool:
    """The applied direction is kept as bits (a vote is no local sign)."""
    return not self.full or self.axis_name is not None

  @property
  def plain_sign(self) -> bool:
    """The direction is tsign(g_t): ||u_t||_inf follows from ||g_t||_1."""
    return (self.axis_name is None and not self.has_momentum
            and not self.has_decay)

  # -- direction --------------------------------------------------------------

  def decayed(self, params: Any) -> Any:
    """A tree of Python bools: the leaves that decay (``mask``, or all)."""
    if not self.has_decay:
      return jax.tree.map(lambda _: False, params)
    mask = self.mask(params) if callable(self.mask) else self.mask
    if mask is None:
      return jax.tree.map(lambda _: True, params)
    return jax.tree.map(lambda m, _: bool(m), mask, params)

  def add_decay(self, signs: Any, x32: Any, params: Any) -> Any:
    """``s + lambda x`` on the decayed leaves, ``s`` elsewhere."""
    wd = self.weight_decay
    return jax.tree.map(lambda s, x, d: s + wd * x if d else s, signs, x32,
                        self.decayed(params))

  def direction(self, grads, params, buffer, t, signs=None,
                alive=None) -> tuple:
    """(g32, x32, new buffer, signs s_t, direction s_t + lambda x_t)."""
    g32 = optax.tree.cast(grads, _F32)
    x32 = optax.tree.cast(params, _F32) if self.has_decay else None
    source, new_buffer = g32, buffer
    if self.has_momentum:
      mu = self.momentum
      new_buffer = jax.tree.map(
          lambda g, m: jnp.where(t == 0, g, mu * m.astype(_F32) + g),
          g32, buffer)
      source = new_buffer
      if self.nesterov:
        source = jax.tree.map(lambda g, m: g + mu * m, g32, new_buffer)
    if signs is None and self.axis_name is None:
      signs = jax.tree.map(lambda v: _sign.tie_sign(v, self.tie), source)
    elif signs is None:
      signs = optax.tree.cast(_communication.vote_signs(
          source, self.axis_name, tie=self.tie, alive=alive), _F32)
    direction = signs
    if self.has_decay:
      direction = self.add_decay(signs, x32, params)
    return g32, x32, new_buffer, signs, direction

  # -- memory -----------------------------------------------------------------

  def init_memory(self, params: Any) -> Union[GradientMemory, SignMemory]:
    signs = (_bits.zero_signs(params, self.tie) if self.keep_bits
             else optax.EmptyState())
    if not self.full:
      decay = (jax.tree.map(
          lambda d: jnp.asarray(self.weight_decay if d else 0.0, _F32),
          self.decayed(params)) if self.has_decay else optax.EmptyState())
      return SignMemory(signs=signs, last_inner=jnp.zeros([], _F32),
                        decay=decay)
    return GradientMemory(
        grad=optax.tree.zeros_like(params, dtype=self.state_dtype),
        window=(optax.tree.zeros_like(params, dtype=_F32)
                if self.has_window else optax.EmptyState()),
        signs=(signs if not self.has_window else optax.EmptyState()),
        tie=jnp.asarray(_TIE_CODES[self.tie], jnp.int8),
        snapshot_step=-jnp.asarray(self.update_gap, jnp.int32))

  def previous_inner(self, memory, gamma_prev, g32, x32, like) -> Any:
    """``<g_t, Delta_t>`` per leaf, ``Delta_t = x_t - x_{t-k}`` from the memory
    (the window, or the previous step rebuilt from the stored direction).

    The step's scalars multiply the leaves' sums, not the parameter-sized
    products, so each reduction reads only arrays (see
    :mod:`optax_sign._reduce`).
    """
    if self.has_window:
      return jax.tree.map(jnp.multiply, g32, memory.window)
    if self.keep_bits:
      inner = _bits.signed_sums(memory.signs, g32)
    else:
      inner = [jnp.sum(g * _sign.reduced_tie_sign(m.astype(_F32), self.tie, i))
               for i, (g, m) in enumerate(zip(jax.tree.leaves(g32),
                                              jax.tree.leaves(memory.grad)))]
    if not self.has_decay:
      return [-gamma_prev * v for v in inner]
    # Sign memory with decay: u_{t-1} = -gamma (s + lambda x_t) / (1 - gamma
    # lambda) on the decayed leaves.
    wd = self.weight_decay
    shrunk = -gamma_prev / _shrink(gamma_prev, wd)
    return [shrunk * (v + wd * jnp.sum(g * x)) if d else -gamma_prev * v
            for v, g, x, d in zip(inner, jax.tree.leaves(g32),
                                  jax.tree.leaves(x32),
                                  jax.tree.leaves(self.decayed(like)))]

  def due(self, memory, t) -> jax.Array:
    """Whether a snapshot is due: ``k`` steps after the last one."""
    if self.gap_one:
      return jnp.asarray(True)
    return t - memory.snapshot_step >= self.update_gap

  def remember(self, memory, updates, bits, u32, t, inner, snap) -> Any:
    """The memory after the step (snapshot, window, bits, secant inner)."""
    if not self.full:
      return memory._replace(signs=bits, last_inner=inner.astype(_F32))
    if self.gap_one:
      grad = _sign.cast_like(updates, memory.grad)
    else:
      grad = jax.tree.map(
          lambda g, old: jnp.where(snap, g.astype(old.dtype), old),
          updates, memory.grad)
    window = memory.window
    if self.has_window:
      window = jax.tree.map(lambda w, u: jnp.where(snap, 0.0, w) + u,
                            memory.window, u32)
      bits = optax.EmptyState()
    return memory._replace(
        grad=grad, window=window, signs=bits,
        snapshot_step=jnp.where(snap, t, memory.snapshot_step))

  # -- statistics -------------------------------------------------------------

  def statistics(self, g32, x32, signs, bits, direction, g_delta, window,
                 ref, secant, like) -> dict:
    """The step's sums and maxima (per worker); ``g_delta`` is
    :meth:`previous_inner`'s."""
    terms = {}
    if secant or not self.option2:
      terms["g_delta"] = ("sum", g_delta)
    if ref is not None:
      terms["num"] = ("sum", jax.tree.map(
          lambda g, p: jnp.abs(g - p.astype(_F32)), g32, ref))
    if secant:
      # <g_t, s_t> from the bits, as the next step's <g_{t+1}, s_t> will be:
      # equal gradients then give exactly a zero difference.
      terms["g_s"] = ("sum", _bits.signed_sums(bits, g32, salt=2**12))
    elif self.plain_sign:  # <g, tsign(g)> = ||g||_1, exactly
      terms["g_s"] = ("sum", jax.tree.map(jnp.abs, g32))
    if not self.plain_sign:
      terms["u_inf"] = ("max", jax.tree.map(jnp.abs, direction))
    if secant and self.has_decay:
      terms["g_x"] = ("sum", jax.tree.map(
          lambda g, x, d: g * x if d else jnp.zeros_like(g), g32, x32,
          self.decayed(like)))
    if not self.gap_one:
      terms["den"] = ("max", jax.tree.map(jnp.abs, window))
    stats = dict(zip(terms, _reduce.global_reduce(
        list(terms.values()), _communication.axis_names(self.axis_name))))
    if self.axis_name is not None:
      # The maxima read only voted (shared) values, but the reductions
      # types them as per worker; one exact scalar pmax makes them shared.
      maxima = [m for m in ("u_inf", "den") if m in stats]
      shared = jax.lax.pmax(jnp.stack([stats[m] for m in maxima]),
                            self.axis_name)
      stats.update(zip(maxima, jnp.unstack(shared)))
    if self.plain_sign:  # ||s_t||_inf from <g_t, tsign(g_t)> = ||g_t||_1.
      num_params = sum(x.size for x in jax.tree.leaves(g32))
      moved = stats["g_s"] > 0 if self.tie == "zero" else num_params > 0
      stats["u_inf"] = jnp.where(jnp.isnan(stats["g_s"]), jnp.nan,
                                 jnp.where(moved, 1.0, 0.0))
    return stats

  # -- estimator --------------------------------------------------------------

  def estimate(self, state, stats, shared, t, secant, sample) -> tuple:
    """(gamma_t, eta_t, D_t, estimator state) from the step's statistics."""
    g_delta, num, f0 = shared["g_delta"], shared["num"], shared["f0"]
    den = state.last_update_norm if self.gap_one else stats["den"]
    if not secant:
      l_hat = num / jnp.where(den > 0, den, 1.0)
    else:
      # <g_{t-1} - g_t, Delta_t> as a difference of two inner products: a
      # difference within their float32 rounding (the gradients did not
      # measurably change) is no curvature sample, and counts as zero.
      last = state.memory.last_inner
      diff = last + g_delta
      noise = _EPS32 * (jnp.abs(last) + jnp.abs(g_delta))
      diff = jnp.where(jnp.abs(diff) <= noise, 0.0, diff)
      l_hat = jnp.maximum(diff / jnp.where(den > 0, den * den, 1.0), 0.)
    ok = sample & (den > 0) & jnp.isfinite(l_hat)
    eta = state.smoothness + jnp.where(ok, l_hat, 0.0)
    estimator: Union[GapState, LowerBoundState]
    if self.option2:
      # f(x_0) is the first finite loss: a NaN or inf first value= waits.
      take = ~state.estimator.measured & jnp.isfinite(f0)
      f_diff = jnp.where(take, jnp.maximum(f0 - self.f_lower, 0.0),
                         state.estimator.f_diff)
      estimator = LowerBoundState(f_diff=f_diff.astype(_F32),
                                  measured=state.estimator.measured | take)
      dist = f_diff
    else:
      d_tilde = state.estimator.d_tilde + jnp.where(sample, -g_delta, 0.0)
      estimator = GapState(d_tilde=d_tilde.astype(_F32))
      dist = jnp.maximum(state.distance, d_tilde)
    gamma = jnp.where(eta > 0, jnp.sqrt(dist / jnp.where(eta > 0, eta, 1.0)),
                      self.first_steps(state.stepsize, t, den > 0))
    if self.max_stepsize is not None:
      gamma = jnp.minimum(gamma, self.max_stepsize)
    recompute = (t == self.warmup_steps) | sample
    gamma = jnp.where(recompute, gamma, state.stepsize)
    dist = jnp.where(recompute, dist, state.distance)
    if self.warmup_stepsize is not None:
      warm = (self.warmup_stepsize(t) if callable(self.warmup_stepsize)
              else self.warmup_stepsize)
      gamma = jnp.where(t < self.warmup_steps, jnp.asarray(warm, _F32), gamma)
    return gamma.astype(_F32), eta, dist, estimator

  def first_steps(self, gamma_prev: jax.Array, t: jax.Array,
                  moved: jax.Array) -> jax.Array:
    """The stepsize while no curvature has been measured (eta = 0).

    ``initial_stepsize``, doubled after every step that moved (``moved``)
    and still measured none, up to ``2^20`` times: a step that rounds away
    in the parameters' dtype (bf16, or float32 of magnitude >= 32) or that
    leaves the gradient unchanged at its resolution grows until it is seen,
    whatever the scale of the parameters and the loss. Float32 unit-scale
    runs measure curvature at the first sample and never double; zero
    gradients (no step) do not double either.
    """
    start = jnp.asarray(self.initial_stepsize, _F32)
    grown = jnp.minimum(2.0 * gamma_prev, start * 2.0**_MAX_DOUBLINGS)
    doubled = (t > self.warmup_steps) & (gamma_prev > 0)
    return jnp.where(doubled, jnp.where(moved, grown, gamma_prev), start)

  # -- the update -------------------------------------------------------------

  def multiplier(self, gamma, t) -> jax.Array:
    """The step actually taken, ``alpha_t gamma_t`` (``gamma_t`` for 1.0)."""
    lr = self.learning_rate
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr == 1:
      return gamma
    lr = lr(t) if callable(lr) else lr
    return (jnp.asarray(lr, _F32) * gamma).astype(_F32)

  def apply(self, gamma, bits, direction, one, updates, x32, params):
    """(updates u_t, float32 u_t); ``gamma`` is the step actually taken."""
    if self.keep_bits:
      # The update reads the new bits instead of the gradient; ``one`` (NaN
      # if a statistic is) then makes the whole update NaN, never hidden.
      applied = _bits.unpack_signs(bits, updates)
      if self.has_decay:
        applied = self.add_decay(applied, x32, params)
      scale = gamma * one
    else:
      applied, scale = direction, gamma
    u32 = jax.tree.map(lambda s: -scale * s, applied)
    new_updates = jax.tree.map(lambda u, g: u.astype(g.dtype), u32, updates)
    return new_updates, u32

  def f0(self, extra_args) -> jax.Array:
    """Option II's f(x_0) (only the first call's value is used)."""
    if not self.option2:
      return jnp.zeros([], _F32)
    if self.initial_value is not None:
      return jnp.asarray(self.initial_value, _F32)
    if extra_args.get("value") is None:
      raise ValueError(
          "scale_by_alias(distance='lower_bound') needs the loss: pass "
          "value=loss to update (only the first call's value is used) or "
          "set initial_value= at construction")
    return _scalar_loss(extra_args["value"])

  def init(self, params) -> AliasState:
    _checks.check_float_params(params)
    zero = jnp.zeros([], _F32)
    return AliasState(
        count=jnp.zeros([], jnp.int32),
        stepsize=zero,
        applied_stepsize=zero,
        smoothness=jnp.asarray(self.eta0, _F32),
        distance=zero if self.option2 else jnp.asarray(self.d0, _F32),
        last_update_norm=zero,
        estimator=(LowerBoundState(f_diff=zero,
                                   measured=jnp.zeros([], bool))
                   if self.option2
                   else GapState(d_tilde=zero)),
        memory=self.init_memory(params),
        direction=(MomentumBuffer(optax.tree.zeros_like(
            params, dtype=self.state_dtype)) if self.has_momentum
                   else optax.EmptyState()))

  def update(self, updates, state, params, extra_args) -> tuple:
    """One step; with ``alive=``, a dead worker's step (one worker) or its own
    memory and momentum (several workers) stay as they were."""
    new_updates, new_state = self.step(updates, state, params, extra_args)
    self.check_stall(state.count, new_state.stepsize)
    alive = extra_args.get("alive")
    if alive is None:
      return new_updates, new_state
    own = self.own_flag(alive)
    keep = lambda new, old: optax.tree.where(own, new, old)
    if self.axis_name is None:
      return (keep(new_updates, optax.tree.zeros_like(new_updates)),
              keep(new_state, state))
    memory = new_state.memory
    if self.full:
      memory = memory._replace(grad=keep(memory.grad, state.memory.grad))
    return new_updates, new_state._replace(
        memory=memory, direction=keep(new_state.direction, state.direction))

  def check_stall(self, t: jax.Array, gamma: jax.Array) -> None:
    """Warns once (from the host, at step 200) if the stepsize has fallen
    below ``initial_stepsize`` (and any cap): ALIAS has stalled (on
    mini-batches, the different-batch estimator settles far below it).
    Outside ``shard_map`` only."""
    initial = jnp.asarray(self.initial_stepsize, _F32)
    if self.max_stepsize is not None:
      initial = jnp.minimum(initial, self.max_stepsize)
    stalled = (t == _STALL_STEP) & (gamma < initial)
    if jax.sharding.get_abstract_mesh().manual_axes:
      return  # shard_map cannot call back with values on Explicit axes
    jax.lax.cond(stalled, lambda *a: jax.debug.callback(_warn_stall, *a),
                 lambda *a: None, stalled, gamma, initial)

  def check_shapes(self, updates, memory, params) -> None:
    """Raises (at trace time) for updates not shaped like ``init``'s params
    or like ``params``."""
    if params is not None:
      _checks.check_shapes(
          updates, [jnp.shape(p) for p in jax.tree.leaves(params)], "params")
    if self.full:
      _checks.check_shapes(updates, [jnp.shape(g) for g in jax.tree.leaves(
          memory.grad)], "the state from init")
    elif self.keep_bits:
      _bits.check_layout(memory.signs, updates)

  def own_flag(self, alive: Any) -> Optional[jax.Array]:
    """This worker's own alive flag (None without ``alive=``)."""
    n = (1 if self.axis_name is None
         else _communication.axis_size(self.axis_name))
    return _communication.alive_flags(alive, self.axis_name, n)[1]

  def share(self, stats, secant, extra_args) -> dict:
    """The gradient scalars averaged over the (live) workers: one pmean."""
    zero = jnp.zeros([], _F32)
    local = jnp.stack([stats.get("g_delta", zero), stats.get("num", zero),
                       self.f0(extra_args), stats["g_s"] if secant else zero,
                       stats.get("g_x", zero)])
    return dict(zip(("g_delta", "num", "f0", "g_s", "g_x"), jnp.unstack(
        _worker_mean(local, self.axis_name, extra_args.get("alive")))))

  def step(self, updates, state, params, extra_args) -> tuple:
    if self.has_decay and params is None:
      raise ValueError("scale_by_alias with weight_decay > 0 needs params: "
                       "call update(grads, state, params)")
    _checks.warn_misspelled(extra_args)
    self.check_shapes(updates, state.memory, params)
    prev_grads = extra_args.get("prev_grads")
    t, secant = state.count, not self.full and prev_grads is None
    buffer = state.direction.momentum if self.has_momentum else None
    g32, x32, _, signs, direction = self.direction(
        updates, params, buffer, t, alive=extra_args.get("alive"))
    g_delta = self.previous_inner(state.memory, state.applied_stepsize, g32,
                                  x32, updates)
    ref = prev_grads if prev_grads is not None else (
        state.memory.grad if self.full else None)
    # The new signs are packed first: the statistics and the update read the
    # bits, so the gradient's signs are taken once.
    bits = (_bits.pack_signs(signs, self.tie) if self.keep_bits
            else optax.EmptyState())
    stats = self.statistics(g32, x32, signs, bits, direction, g_delta,
                            getattr(state.memory, "window", None), ref, secant,
                            updates)
    # The new state is built from inputs tied to every scalar by a product
    # with one, so XLA writes the donated state buffers in place after all the
    # reductions have read them instead of copying them first. One is NaN if
    # a statistic is not finite (a NaN or infinite gradient, memory or
    # prev_grads): the update is then NaN, for apply_if_finite to skip.
    # With workers, the per-worker inputs are tied to this worker's own
    # statistics (a dead worker's NaN stays out), the shared ones to the
    # shared maxima: a non-finite statistic of a live worker reaches every
    # worker through the averaged scalars.
    nan_in = lambda values: jnp.any(~jnp.isfinite(jnp.stack(values)))
    own = self.own_flag(extra_args.get("alive"))
    local = nan_in(list(stats.values()))
    local = local if own is None else local & own
    common = nan_in([stats[m] for m in ("u_inf", "den") if m in stats])
    one = jnp.where(local if self.axis_name is None else common, jnp.nan, 1.)
    mine = jnp.where(local | common, jnp.nan, 1.0)
    tie = lambda x, c: x * c.astype(x.dtype)
    updates, buffer = jax.tree.map(lambda x: tie(x, mine), (updates, buffer))
    params, voted = jax.tree.map(lambda x: tie(x, one), (
        params if self.has_decay else None,
        None if self.axis_name is None else signs))
    g32, x32, buffer, signs, direction = self.direction(
        updates, params, buffer, t, voted)
    shared = self.share(stats, secant, extra_args)
    due = self.due(state.memory, t)
    sample = (t > self.warmup_steps) & due
    gamma, eta, dist, estimator = self.estimate(state, stats, shared, t,
                                                secant, sample)
    # A zero k-step difference (the iterates came back, e.g. a period-2 orbit
    # with an even k) keeps the snapshot, so the next difference spans more
    # steps: the estimator never stops for good.
    snap = due if self.gap_one else due & ~(sample & (stats["den"] <= 0))
    step = self.multiplier(gamma, t)
    new_updates, u32 = self.apply(step, bits, direction, one, updates, x32,
                                  params)
    inner = step * (shared["g_s"] + self.weight_decay * shared["g_x"]
                    if self.has_decay else shared["g_s"])
    return new_updates, AliasState(
        count=optax.safe_increment(t),
        stepsize=gamma,
        applied_stepsize=step,
        smoothness=eta.astype(_F32),
        distance=dist.astype(_F32),
        last_update_norm=(step * stats["u_inf"]).astype(_F32),
        estimator=estimator,
        memory=self.remember(state.memory, updates, bits, u32, t, inner,
                             snap),
        direction=(MomentumBuffer(_sign.cast_like(buffer, state.direction.momentum))
                   if self.has_momentum else state.direction))


def _shrink(gamma: jax.Array, rate: Any) -> jax.Array:
  """``1 - gamma rate``, the decay's factor on x (1 where it is not positive).

  With it ``u_{t-1} = -gamma (s + rate x_{t-1})`` is rebuilt from
  ``x_t = x_{t-1} + u_{t-1}`` as ``-gamma (s + rate x_t) / shrink``.
  """
  shrink = 1.0 - gamma * rate
  return jnp.where(shrink > 0, shrink, 1.0)


def scale_by_alias(
    distance: str = "gap",
    *,
    learning_rate: optax.ScalarOrSchedule = 1.0,
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
    mask: Optional[Any] = None,
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
    u_t = -\alpha_t\gamma_t\big(\operatorname{tsign}(g_t) + \lambda x_t\big),

  with :math:`\alpha_t` the ``learning_rate`` multiplier (1 by default; a
  schedule, e.g. a warmup or a cosine decay, multiplies ALIAS's stepsize). The
  statistics use the steps actually taken, :math:`\alpha_t\gamma_t`.

  Statistics are sampled and :math:`\gamma` recomputed every ``update_gap``
  steps after ``warmup_steps`` steps of plain Sign-SGD at
  ``warmup_stepsize``; :math:`\gamma` is held in between. A zero iterate
  difference skips the sample, :math:`\eta = 0` gives ``initial_stepsize``
  (doubled after every step that moved while :math:`\eta` stays 0, at most
  :math:`2^{20}` times: a first step that rounds away in bf16 or around
  large parameters grows until curvature is measured), and
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

  The state is an :class:`AliasState` whose parts are typed by configuration:
  the estimator (:class:`GapState` or :class:`LowerBoundState`), the memory
  (:class:`GradientMemory` or :class:`SignMemory`) and the direction's
  :class:`MomentumBuffer` (``optax.EmptyState`` without momentum).

  Extra arguments of ``update``: ``value`` (the loss; needed on every call for
  ``distance="lower_bound"`` without ``initial_value``, only the first is
  used), ``prev_grads`` (same-batch estimator: the current batch's gradient
  at :math:`x_{t-k}`, see :func:`alias_previous_params`; replaces the stored
  gradient in the numerator), ``alive`` (this worker's flag or an ``(N,)``
  mask: the vote and the averaged statistics leave dead workers out, a dead
  worker keeps its own gradient memory and momentum; on one worker a dead
  step is skipped) and ``params`` (needed for weight decay).

  All arguments but ``distance`` are keyword-only.

  Args:
    distance: ``"gap"`` (Option I) or ``"lower_bound"`` (Option II).
    learning_rate: :math:`\alpha_t \ge 0`, a scalar or a schedule of the
      step count multiplying the ALIAS stepsize.
    d0: Option I floor of the distance estimate, > 0.
    f_lower: Option II lower bound of the loss.
    initial_value: Option II :math:`f(x_0)`; if None it is taken from the
      first ``value=``.
    eta0: initial smoothness accumulator, >= 0.
    initial_stepsize: stepsize used at a recompute while :math:`\eta = 0`
      (then doubled after each step that moved, see above); a stepsize still
      below it at step 200 warns once (ALIAS has stalled).
    max_stepsize: optional cap on :math:`\gamma`.
    update_gap: :math:`k \ge 1`; must be 1 for ``memory="sign"``.
    warmup_steps: steps of plain Sign-SGD before ALIAS starts.
    warmup_stepsize: scalar or schedule of the step count; required when
      ``warmup_steps > 0``.
    weight_decay: decoupled decay :math:`\lambda \ge 0`, scaled by
      :math:`\gamma_t` (needs ``params``).
    mask: tree or callable choosing the decayed leaves (as in
      ``optax.add_decayed_weights``); ``None`` decays every leaf.
    momentum: :math:`0 \le \mu < 1`: the direction is the sign of the buffer
      :math:`m_t = \mu m_{t-1} + g_t` (:math:`m_0 = g_0`); the statistics stay
      on raw gradients. Decides whether a buffer exists: pass a Python number.
    nesterov: use :math:`\operatorname{tsign}(g_t + \mu m_t)`.
    memory: ``"full"`` or ``"sign"``.
    tie: tie policy of the sign (see :func:`optax_sign.tie_sign`).
    state_dtype: dtype of the gradient snapshot and momentum buffer.
    axis_name: optional named axis of workers. The direction is then the
      majority vote of the workers' directions and every worker computes the
      same stepsize from one ``pmean`` of a few scalars.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose updates come out in the
    gradient's dtype.

  Example:
    >>> tx = scale_by_alias()                       # Option I, no tuning
    >>> tx = scale_by_alias("lower_bound", f_lower=0.0)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params, value=value)
    >>> float(optax.tree.get(state, "stepsize")) > 0
    True

  References:
    Medyakov et al., "Sign-SGD is the Golden Gate between Multi-Node to
    Single-Node Learning: Significant Boost via Parameter-Free Optimization",
    arXiv 2506.03725.
  """

  _checks.check_choice("distance", distance, DISTANCES)
  _checks.check_nonnegative_or_schedule("learning_rate", learning_rate)
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
  alias = _Alias(
      option2=distance == "lower_bound", learning_rate=learning_rate,
      memory=memory, tie=tie,
      axis_name=axis_name, update_gap=update_gap, d0=d0, f_lower=f_lower,
      initial_value=initial_value, eta0=eta0,
      initial_stepsize=initial_stepsize, max_stepsize=max_stepsize,
      warmup_steps=warmup_steps, warmup_stepsize=warmup_stepsize,
      weight_decay=weight_decay, mask=mask, momentum=momentum,
      nesterov=nesterov,
      state_dtype=_checks.check_float_dtype("state_dtype", state_dtype))

  def update_fn(updates, state, params=None, **extra_args):
    return alias.update(updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(alias.init, update_fn)


def _check_warmup(warmup_steps: Any, warmup_stepsize: Any) -> None:
  """A warmup needs its stepsize (scalar or schedule)."""
  if warmup_stepsize is None:
    if _concrete_int(warmup_steps) not in (0, None):
      raise ValueError(
          "warmup_stepsize (a scalar or a schedule) is required when "
          f"warmup_steps > 0, got warmup_steps={warmup_steps}")
  else:
    _checks.check_nonnegative_or_schedule("warmup_stepsize", warmup_stepsize)


def _find_alias_state(state: Any) -> AliasState:
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, AliasState))
           if isinstance(s, AliasState)]
  if len(found) != 1:
    raise ValueError("expected exactly one AliasState in the optimizer state, "
                     f"found {len(found)}")
  return found[0]


def alias_previous_params(params: optax.Params,
                          state: optax.OptState) -> optax.Params:
  r"""The iterate :math:`x_{t-k}` for the same-batch estimator.

  Returns :math:`x_t - (x_t - x_{t-k})`: the stored window when there is one,
  otherwise :math:`x_t - u_{t-1}` rebuilt from the stored direction (the tie
  policy and decay rates are read from the state). Evaluate the current
  batch's gradient there and pass it as ``prev_grads=``. Flax NNX trees are
  accepted as they are (``nnx.state(model, nnx.Param)`` and
  ``optimizer.opt_state``); the result has the structure of ``params``.

  Args:
    params: the current parameters :math:`x_t`.
    state: the optimizer state (any state containing one :class:`AliasState`).

  Returns:
    A tree like ``params``.

  Example:
    >>> tx = alias_sign_sgd(memory="sign", tie="positive")
    >>> state = tx.init(params)
    >>> previous = alias_previous_params(params, state)
    >>> prev_grads = jax.grad(loss)(previous)     # the same batch, at x_{t-1}
    >>> updates, state = tx.update(grads, state, params, prev_grads=prev_grads)
  """
  s = _find_alias_state(state)
  memory = s.memory
  # Leaves in order, so that wrapped trees (Flax NNX ``Param`` parameters and
  # ``OptVariable`` states) combine as they are.
  x, treedef = jax.tree.flatten(params)
  gamma = jax.tree.leaves(s.applied_stepsize)[0]
  window = getattr(memory, "window", optax.EmptyState())
  if not _absent(window):  # x_t - x_{t-k} itself
    steps = jax.tree.leaves(window)
  elif not _absent(memory.signs):  # u_{t-1} as in the update
    signs = jax.tree.leaves(_bits.unpack_signs(memory.signs, params))
    decay = getattr(memory, "decay", optax.EmptyState())
    rates = [0.0] * len(x) if _absent(decay) else jax.tree.leaves(decay)
    steps = [-gamma * (d + r * xi.astype(_F32)) / _shrink(gamma, r)
             for d, xi, r in zip(signs, x, rates)]
  else:
    assert isinstance(memory, GradientMemory)
    code = jax.tree.leaves(memory.tie)[0]
    steps = [-gamma * _tie_sign_coded(g.astype(_F32), code)
             for g in jax.tree.leaves(memory.grad)]
  return jax.tree.unflatten(treedef, [
      (xi.astype(_F32) - u).astype(xi.dtype) for xi, u in zip(x, steps)])
