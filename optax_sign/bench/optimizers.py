"""The optimizer registry of the benchmark: optax_sign optimizers and baselines.

Each entry builds an optax transformation from a learning rate (``None`` for
parameter-free methods) and a :class:`Context` (axis name, step budget, the
task's loss lower bound). optax_sign functions are looked up on the package at
run time, so an entry whose function is not in the installed version is listed
as unavailable (with the missing name) instead of breaking the registry.

Single-worker entries run with ``--workers 1``; multi-worker entries need
``--workers N`` with N >= 2 and communicate over the axis ``workers``.
"""

import dataclasses
from typing import Callable, Optional, Sequence

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
    requires: names that must exist on the ``optax_sign`` module.
    multi_worker: True for entries that communicate over ``Context.axis_name``.
    sync_every: communication interval in steps (local-steps methods).
    same_batch: the step also evaluates the current batch's gradient at
      ``optax_sign.alias_previous_params`` and passes it as ``prev_grads=``
      (ALIAS's same-batch smoothness estimator; one extra gradient per step).
  """
  name: str
  description: str
  build: Callable[[Optional[float], Context], optax.GradientTransformation]
  default_lr: Optional[float] = None
  requires: tuple = ()
  multi_worker: bool = False
  sync_every: int = 1
  same_batch: bool = False

  @property
  def missing(self) -> tuple:
    """The required optax_sign names this installation lacks."""
    return tuple(n for n in self.requires if not hasattr(optax_sign, n))

  @property
  def available(self) -> bool:
    return not self.missing

  @property
  def tunable(self) -> bool:
    return self.default_lr is not None


def _os(name: str):
  return getattr(optax_sign, name)


def pmean_gradients(axis_name: str) -> optax.GradientTransformationExtraArgs:
  """Data-parallel baseline: averages gradients with one fp32 all-reduce."""

  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.lax.pmean(updates, axis_name), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update)


def _data_parallel(make: Callable[[float], optax.GradientTransformation]):
  return lambda lr, ctx: optax.chain(pmean_gradients(ctx.axis_name), make(lr))


LOCAL_SYNC_EVERY = 8

def _local_entry(name: str, preset: str, what: str) -> "Entry":
  """A local-steps preset of optax_sign, synchronising every few steps."""
  return Entry(
      name, f"{what} every {LOCAL_SYNC_EVERY} steps",
      lambda lr, ctx: _os(preset)(lr, sync_every=LOCAL_SYNC_EVERY,
                                  axis_name=ctx.axis_name),
      1e-3, requires=(preset,), multi_worker=True,
      sync_every=LOCAL_SYNC_EVERY)


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
    Entry("alias", "optax_sign.alias_sign_sgd() (parameter-free, Option I)",
          lambda lr, ctx: _os("alias_sign_sgd")(),
          requires=("alias_sign_sgd",)),
    Entry("alias_lb", "optax_sign.alias_sign_sgd(distance='lower_bound', "
          "f_lower=task bound) (parameter-free, Option II, uses value=)",
          lambda lr, ctx: _os("alias_sign_sgd")(distance="lower_bound",
                                                f_lower=ctx.f_lower),
          requires=("alias_sign_sgd",)),
    Entry("alias_sign", "optax_sign.alias_sign_sgd(memory='sign', "
          "tie='positive') (parameter-free, 1 bit of memory per parameter)",
          lambda lr, ctx: _os("alias_sign_sgd")(memory="sign", tie="positive"),
          requires=("alias_sign_sgd",)),
    Entry("alias_sb", "optax_sign.alias_sign_sgd() with the same-batch "
          "estimator (prev_grads=; 2 gradients per step)",
          lambda lr, ctx: _os("alias_sign_sgd")(),
          requires=("alias_sign_sgd", "alias_previous_params"),
          same_batch=True),
    Entry("alias_lb_sb", "alias_lb with the same-batch estimator "
          "(prev_grads=; 2 gradients per step)",
          lambda lr, ctx: _os("alias_sign_sgd")(distance="lower_bound",
                                                f_lower=ctx.f_lower),
          requires=("alias_sign_sgd", "alias_previous_params"),
          same_batch=True),
    Entry("os_sign_sgd", "optax_sign.sign_sgd",
          lambda lr, ctx: _os("sign_sgd")(lr), 1e-2, requires=("sign_sgd",)),
    Entry("os_signum", "optax_sign.signum",
          lambda lr, ctx: _os("signum")(lr), 1e-3, requires=("signum",)),
    Entry("os_lion", "optax_sign.lion_like",
          lambda lr, ctx: _os("lion_like")(lr), 1e-4, requires=("lion_like",)),
    Entry("ef_sign_sgd", "chain(optax_sign.scale_by_error_feedback_sign(), "
          "scale_by_learning_rate)",
          lambda lr, ctx: optax.chain(_os("scale_by_error_feedback_sign")(),
                                      optax.scale_by_learning_rate(lr)),
          1e-2, requires=("scale_by_error_feedback_sign",)),
    # Multi-worker (axis "workers").
    Entry("dp_sgd", "data-parallel SGD: fp32 pmean of gradients, optax.sgd",
          _data_parallel(optax.sgd), 1e-1, multi_worker=True),
    Entry("dp_adamw", "data-parallel AdamW: fp32 pmean of gradients",
          _data_parallel(optax.adamw), 1e-3, multi_worker=True),
    Entry("dp_sign_sgd", "sign of the fp32-averaged gradient",
          _data_parallel(optax.sign_sgd), 1e-2, multi_worker=True),
    Entry("majority_vote", "Sign-SGD with majority vote "
          "(optax_sign.majority_vote, transport 'auto')",
          lambda lr, ctx: optax.chain(
              _os("majority_vote")(ctx.axis_name),
              optax.scale_by_learning_rate(lr)),
          1e-2, requires=("majority_vote",), multi_worker=True),
    Entry("alias_mv", "multi-node ALIAS: majority vote with a common "
          "parameter-free stepsize",
          lambda lr, ctx: _os("alias_sign_sgd")(axis_name=ctx.axis_name),
          requires=("alias_sign_sgd", "majority_vote"), multi_worker=True),
    Entry("alias_mv_sb", "alias_mv with the same-batch estimator "
          "(prev_grads=; 2 gradients per step)",
          lambda lr, ctx: _os("alias_sign_sgd")(axis_name=ctx.axis_name),
          requires=("alias_sign_sgd", "majority_vote", "alias_previous_params"),
          multi_worker=True, same_batch=True),
    _local_entry("dsm_ls", "dsm_ls", "DSM-LS: local AdamW, global sign momentum"),
    _local_entry("diloco", "diloco", "DiLoCo: local AdamW, Nesterov outer step"),
    _local_entry("slowmo", "slowmo", "SlowMo: local AdamW, slow momentum"),
    _local_entry("local_adamw", "model_averaging",
                 "Local AdamW: model averaging"),
)

REGISTRY = {e.name: e for e in _ENTRIES}
ALIASES = {"contrib.prodigy": "prodigy", "contrib.dog": "dog",
           "contrib.mechanize": "mechanize"}

DEFAULT_SINGLE = ("alias", "alias_sb", "adamw")
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
  if entry.missing:
    raise ValueError(f"optimizer {entry.name!r} needs optax_sign."
                     f"{', optax_sign.'.join(entry.missing)}, which this "
                     "installation lacks")
  if entry.tunable:
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


def available(names: Sequence[str]) -> tuple:
  """(usable entries, messages about skipped ones)."""
  usable, skipped = [], []
  for name in names:
    entry = lookup(name)
    if entry.available:
      usable.append(entry)
    else:
      skipped.append(f"skipping {entry.name!r}: optax_sign."
                     f"{', optax_sign.'.join(entry.missing)} is not available "
                     "in this installation")
  return usable, skipped
