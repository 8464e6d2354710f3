"""The optimizer registry of the benchmark: optax_sign optimizers and baselines.

Each entry builds an optax transformation from a learning rate (``None`` for
parameter-free methods) and a :class:`Context` (axis name, step budget, the
task's loss lower bound). The optax_sign functions are taken from the package
when this module is imported, so a missing export fails the import.

Single-worker entries run with ``--workers 1``; multi-worker entries need
``--workers N`` with N >= 2 and communicate over the axis ``workers``.
"""

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np
import optax
from optax import contrib

import optax_sign

AXIS = "workers"


@dataclasses.dataclass(frozen=True)
class Context:
  """What a builder may need besides the learning rate."""
  axis_name: Optional[str] = None
  steps: int = 100
  f_lower: float = 0.0


@dataclasses.dataclass(frozen=True)
class Entry:
  """One optimizer of the registry.

  Attributes:
    name: the CLI name.
    description: one line for ``--list`` and the report.
    build: ``build(learning_rate, context) -> GradientTransformation``.
    default_lr: the learning rate used without ``--grid`` or ``--lr``; None
      for parameter-free methods (they take no learning rate).
    multi_worker: True for entries that communicate over ``Context.axis_name``.
    sync_every: communication interval in steps (local-steps methods).
    local_steps: a local-steps method: the model to evaluate is
      ``optax_sign.local_steps_anchor(state)``, not the local parameters.
    same_batch: the step also evaluates the current batch's gradient at
      ``optax_sign.alias_previous_params`` and passes it as ``prev_grads=``
      (ALIAS's same-batch smoothness estimator; one extra gradient per step).
  """
  name: str
  description: str
  build: Callable[[Optional[float], Context], optax.GradientTransformation]
  default_lr: Optional[float] = None
  multi_worker: bool = False
  sync_every: int = 1
  local_steps: bool = False
  same_batch: bool = False

  @property
  def tunable(self) -> bool:
    return self.default_lr is not None


def pmean_gradients(axis_name: str) -> optax.GradientTransformationExtraArgs:
  """Data-parallel baseline: averages gradients with one fp32 all-reduce."""

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.lax.pmean(updates, axis_name), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update)


def _data_parallel(make: Callable[[float], optax.GradientTransformation]):
  return lambda lr, ctx: optax.chain(pmean_gradients(ctx.axis_name), make(lr))


def _with_lr(make: Callable[[float], optax.GradientTransformation]):
  """The builder ``make(learning_rate)``."""
  return lambda lr, ctx: make(lr)


def _scaled(direction: Callable[..., optax.GradientTransformation],
            collective: bool = False):
  """The builder ``chain(direction(), scale_by_learning_rate(lr))``.

  A collective direction is called with ``axis_name=`` the context's axis.
  """
  def build(lr, ctx):
    kwargs = {"axis_name": ctx.axis_name} if collective else {}
    return optax.chain(direction(**kwargs), optax.scale_by_learning_rate(lr))
  return build


def _alias_entry(name: str, description: str, *, lower_bound: bool = False,
                 multi_worker: bool = False, same_batch: bool = False,
                 released: bool = False, **options) -> Entry:
  """An ``optax_sign.alias_sign_sgd(**options)`` entry (parameter-free).

  ``lower_bound`` selects Option II with the task's loss lower bound;
  multi-worker entries vote over the context's axis. ``released`` builds
  ``chain(clip_by_global_norm(1), alias_sign_sgd_released(total_steps=the
  run's steps, f_lower=the task's bound, **options))`` instead, the released
  code's configuration as its docstring gives it.
  """
  make = optax_sign.alias_sign_sgd
  make_released = optax_sign.alias_sign_sgd_released

  def build(lr, ctx):
    del lr
    kwargs = dict(options)
    if multi_worker:
      kwargs["axis_name"] = ctx.axis_name
    if released:
      return optax.chain(
          optax.clip_by_global_norm(1.0),
          make_released(total_steps=ctx.steps, f_lower=ctx.f_lower, **kwargs))
    if lower_bound:
      kwargs.update(distance="lower_bound", f_lower=ctx.f_lower)
    return make(**kwargs)

  return Entry(name, description, build, multi_worker=multi_worker,
               same_batch=same_batch)


LOCAL_SYNC_EVERY = 8
RANDOMIZED_SIGN_SEED = 0  # the same key on every worker, as DSM-LS needs


def _dsm_ls_randomized(learning_rate, **kwargs):
  """DSM-LS with the randomized sign; the key is made when the run builds it."""
  return optax_sign.dsm_ls(
      learning_rate, key=jax.random.key(RANDOMIZED_SIGN_SEED), **kwargs)


def _local_entry(name: str, preset: Callable[..., optax.GradientTransformation],
                 what: str) -> Entry:
  """A local-steps preset of optax_sign, synchronising every few steps."""
  return Entry(
      name, f"{what} every {LOCAL_SYNC_EVERY} steps",
      lambda lr, ctx: preset(lr, sync_every=LOCAL_SYNC_EVERY,
                             axis_name=ctx.axis_name),
      1e-3, multi_worker=True, sync_every=LOCAL_SYNC_EVERY, local_steps=True)


# optax_sign functions are read from the package here, when the registry is
# built: a missing or renamed export fails at import, not during a run.
_ENTRIES = (
    # optax baselines (one worker).
    Entry("sgd", "optax.sgd", lambda lr, ctx: optax.sgd(lr), 1e-1),
    Entry("adamw", "optax.adamw (weight_decay 1e-4)",
          lambda lr, ctx: optax.adamw(lr), 1e-3),
    Entry("lion", "optax.lion", lambda lr, ctx: optax.lion(lr), 1e-4),
    Entry("sign_sgd", "optax.sign_sgd", lambda lr, ctx: optax.sign_sgd(lr),
          1e-2),
    Entry("signum", "optax.signum", lambda lr, ctx: optax.signum(lr), 1e-3),
    Entry("prodigy", "optax.contrib.prodigy (parameter-free)",
          lambda lr, ctx: contrib.prodigy()),
    Entry("dog", "optax.contrib.dog (parameter-free)",
          lambda lr, ctx: contrib.dog()),
    Entry("mechanize", "optax.contrib.mechanize(optax.sign_sgd(1.0)) "
          "(parameter-free)",
          lambda lr, ctx: contrib.mechanize(optax.sign_sgd(1.0))),
    # optax_sign (one worker).
    _alias_entry("alias",
                 "optax_sign.alias_sign_sgd() (parameter-free, Option I)"),
    _alias_entry("alias_lb", "optax_sign.alias_sign_sgd(distance='lower_bound'"
                 ", f_lower=task bound) (parameter-free, Option II, uses "
                 "value=)", lower_bound=True),
    _alias_entry("alias_sign", "optax_sign.alias_sign_sgd(memory='sign', "
                 "tie='positive') (parameter-free, 1 bit of memory per "
                 "parameter)", memory="sign", tie="positive"),
    Entry("alias_st", "optax_sign.alias_sign_sgd_stochastic() (parameter-free,"
          " mini-batch preset: statistics 20 steps apart, momentum 0.9)",
          lambda lr, ctx: optax_sign.alias_sign_sgd_stochastic()),
    _alias_entry("alias_sb", "optax_sign.alias_sign_sgd() with the same-batch "
                 "estimator (prev_grads=; 2 gradients per step)",
                 same_batch=True),
    _alias_entry("alias_lb_sb", "alias_lb with the same-batch estimator "
                 "(prev_grads=; 2 gradients per step)", lower_bound=True,
                 same_batch=True),
    Entry("os_sign_sgd", "optax_sign.sign_sgd",
          _with_lr(optax_sign.sign_sgd), 1e-2),
    Entry("os_signum", "optax_sign.signum", _with_lr(optax_sign.signum), 1e-3),
    Entry("os_lion", "optax_sign.lion_like", _with_lr(optax_sign.lion_like),
          1e-4),
    Entry("ef_sign_sgd", "chain(optax_sign.scale_by_error_feedback_sign(), "
          "scale_by_learning_rate)",
          _scaled(optax_sign.scale_by_error_feedback_sign), 1e-2),
    _alias_entry("alias_released", "chain(clip_by_global_norm(1), optax_sign."
                 "alias_sign_sgd_released(total_steps=run steps, f_lower=task "
                 "bound)) (parameter-free, capped at 1e-3, uses value=)",
                 released=True),
    Entry("alias_momentum", "optax_sign.scale_by_alias_momentum(learning_rate"
          "=lr, d0=1) (experimental Adam-like ALIAS; emits the final update)",
          _with_lr(lambda lr: optax_sign.scale_by_alias_momentum(
              learning_rate=lr, d0=1.0)), 1e-2),
    # Multi-worker (axis "workers").
    Entry("dp_sgd", "data-parallel SGD: fp32 pmean of gradients, optax.sgd",
          _data_parallel(optax.sgd), 1e-1, multi_worker=True),
    Entry("dp_adamw", "data-parallel AdamW: fp32 pmean of gradients",
          _data_parallel(optax.adamw), 1e-3, multi_worker=True),
    Entry("dp_sign_sgd", "sign of the fp32-averaged gradient",
          _data_parallel(optax.sign_sgd), 1e-2, multi_worker=True),
    Entry("majority_vote", "Sign-SGD with majority vote "
          "(optax_sign.majority_vote, transport 'auto')",
          _scaled(optax_sign.majority_vote, collective=True), 1e-2,
          multi_worker=True),
    _alias_entry("alias_mv", "multi-node ALIAS: majority vote with a common "
                 "parameter-free stepsize", multi_worker=True),
    _alias_entry("alias_mv_sb", "alias_mv with the same-batch estimator "
                 "(prev_grads=; 2 gradients per step)", multi_worker=True,
                 same_batch=True),
    _alias_entry("alias_mv_sign", "multi-node ALIAS with 1 bit of memory "
                 "(memory='sign', tie='positive')", multi_worker=True,
                 memory="sign", tie="positive"),
    _alias_entry("alias_mv_rel", "alias_released with majority vote "
                 "across workers", multi_worker=True, released=True),
    Entry("mean_of_signs", "mean of the workers' signs "
          "(optax_sign.mean_of_signs, transport 'auto'), then the lr",
          _scaled(optax_sign.mean_of_signs, collective=True), 1e-2,
          multi_worker=True),
    Entry("ef_mean_signs", "error feedback across workers: chain(optax_sign."
          "scale_by_error_feedback_sign(axis_name), scale_by_learning_rate)",
          _scaled(optax_sign.scale_by_error_feedback_sign, collective=True),
          1.0, multi_worker=True),  # best of a 1e-4..1 grid on logreg and mlp
    _local_entry("dsm_ls", optax_sign.dsm_ls,
                 "DSM-LS: local AdamW, global sign momentum"),
    _local_entry("dsm_ls_rand", _dsm_ls_randomized,
                 "DSM-LS with the randomized sign (key seed "
                 f"{RANDOMIZED_SIGN_SEED}): local AdamW, global sign momentum"),
    _local_entry("diloco", optax_sign.diloco,
                 "DiLoCo: local AdamW, Nesterov outer step"),
    _local_entry("slowmo", optax_sign.slowmo,
                 "SlowMo: local AdamW, slow momentum"),
    _local_entry("local_adamw", optax_sign.model_averaging,
                 "Local AdamW: model averaging"),
)

REGISTRY = {e.name: e for e in _ENTRIES}
ALIASES = {"contrib.prodigy": "prodigy", "contrib.dog": "dog",
           "contrib.mechanize": "mechanize"}

DEFAULT_SINGLE = ("alias", "alias_st", "alias_sb", "adamw")
DEFAULT_GRID = ("sign_sgd",)
DEFAULT_MULTI = ("majority_vote", "alias_mv_sb", "dsm_ls", "diloco",
                 "dp_adamw", "dp_sign_sgd")


def lookup(name: str) -> Entry:
  """The entry for ``name`` (ValueError listing the known names)."""
  entry = REGISTRY.get(ALIASES.get(name, name))
  if entry is None:
    raise ValueError(f"unknown optimizer {name!r}; known: "
                     f"{', '.join(sorted(REGISTRY))}")
  return entry


def log_grid(low: float, high: float, points: int) -> list:
  """``points`` learning rates spaced evenly in log scale from low to high."""
  if not 0 < low <= high or points < 1:
    raise ValueError(f"bad grid: need 0 < low <= high and points >= 1, got "
                     f"low={low}, high={high}, points={points}")
  if points == 1:
    return [float(low)]
  return [float(f"{v:.3g}") for v in np.geomspace(low, high, points)]


def build(entry: Entry, learning_rate: Optional[float], context: Context
          ) -> optax.GradientTransformationExtraArgs:
  """The transformation for a run; a tunable one has an injected learning rate.

  For tunable entries the learning rate lives in the state
  (``optax.inject_hyperparams``), so the runs of a grid share one compiled
  step; change it with :func:`set_learning_rate`.
  """
  if entry.tunable:
    if learning_rate is None:
      raise ValueError(f"optimizer {entry.name!r} needs a learning rate")
    tx = optax.inject_hyperparams(
        lambda learning_rate: entry.build(learning_rate, context))(
            learning_rate=float(learning_rate))
  else:
    tx = entry.build(None, context)
  return optax.with_extra_args_support(tx)


def set_learning_rate(state, learning_rate: float):
  """Sets the injected learning rate of a state made by :func:`build`."""
  hyper = getattr(state, "hyperparams", None)
  if hyper is None or "learning_rate" not in hyper:
    raise ValueError("this optimizer state has no injected learning_rate")
  old = hyper["learning_rate"]
  new = np.full(np.shape(old), learning_rate, old.dtype)
  sharding = getattr(old, "sharding", None)
  hyper["learning_rate"] = new if sharding is None else jax.device_put(
      new, sharding)  # keep the placement the compiled step expects
  return state

