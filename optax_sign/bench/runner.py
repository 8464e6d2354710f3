"""Training loops: one compiled step per (task, optimizer), timed runs, grids.

A :class:`Stepper` holds the compiled step and knows how to make a fresh
state; :func:`train` runs it for a number of steps with a progress bar and
records the objective, the wall time of the steps (compilation and
evaluation excluded), the stepsize when the optimizer state has a
``stepsize`` field, the cumulative bytes on the wire for multi-worker runs,
and the task's held-out metrics (``test_loss``, ``test_accuracy``,
``val_loss``) at the same points. :class:`CompileClock` adds up the time JAX
spends compiling, whatever compiles.
"""

import dataclasses
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sign
from optax_sign.bench import optimizers as opt_lib
from optax_sign.bench import tasks as task_lib

# jax.monitoring events of one top-level compilation: tracing to a jaxpr,
# lowering to StableHLO, and XLA's compile (or the load of the executable from
# the persistent compilation cache, which also records a cache hit).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileClock:
  """Adds up JAX's compilations while it is active (a context manager).

  Every program counts: jitted steps and evaluations, and the one-operation
  programs of eager calls.

  Attributes:
    seconds: time spent tracing, lowering and compiling programs (or loading
      them from the persistent compilation cache).
    programs: the number of programs compiled or loaded.
    cache_hits: how many of them the persistent compilation cache supplied.
  """

  def __init__(self):
    self.seconds = 0.0
    self.programs = 0
    self.cache_hits = 0

  def _on_duration(self, event: str, duration_secs: float,
                   **kwargs: str | int) -> None:
    del kwargs
    if event in COMPILE_EVENTS:
      self.seconds += duration_secs
      self.programs += event == COMPILE_EVENTS[-1]

  def _on_event(self, event: str, **kwargs: str | int) -> None:
    del kwargs
    self.cache_hits += event == CACHE_HIT_EVENT

  @property
  def compiled(self) -> int:
    """Programs XLA compiled afresh (not loaded from the cache)."""
    return self.programs - self.cache_hits

  def __enter__(self) -> "CompileClock":
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc_info) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)


@dataclasses.dataclass
class Run:
  """The record of one training run (all lists share one index)."""
  optimizer: str
  learning_rate: Optional[float]
  steps: list = dataclasses.field(default_factory=list)
  loss: list = dataclasses.field(default_factory=list)
  seconds: list = dataclasses.field(default_factory=list)
  stepsize: list = dataclasses.field(default_factory=list)
  bytes: list = dataclasses.field(default_factory=list)
  # Held-out metrics by name (e.g. "test_accuracy"), one value per step.
  metrics: dict = dataclasses.field(default_factory=dict)
  compile_seconds: float = 0.0
  bytes_per_step: Optional[float] = None  # per synchronising step
  sync_every: int = 1
  diverged: bool = False

  @property
  def final_loss(self) -> float:
    return self.loss[-1]

  @property
  def best_loss(self) -> float:
    finite = [v for v in self.loss if math.isfinite(v)]
    return min(finite) if finite else math.inf

  @property
  def final_metrics(self) -> dict:
    """The held-out metrics at the last recorded step (empty if none)."""
    return {k: v[-1] for k, v in self.metrics.items() if v}

  @property
  def total_seconds(self) -> float:
    return self.seconds[-1] if self.seconds else 0.0

  @property
  def num_steps(self) -> int:
    return self.steps[-1] if self.steps else 0


@dataclasses.dataclass
class Stepper:
  """A compiled training step and its companions.

  Attributes:
    init: ``init() -> (params, state)``, fresh copies for a new run.
    step: compiled ``step(params, state, data, key) -> (params, state, loss)``.
    data: the ``data`` argument of ``step`` (placed on the right devices).
    evaluate: ``evaluate(params, state) -> float``: the task's objective at
      the model to report (the anchor for local-steps methods).
    compile_seconds: time spent compiling ``step``.
    bytes_per_step: bytes sent per worker by one step (None if unknown or
      single-worker); for local-steps methods, by one synchronising step.
    sync_every: steps between communications.
    metrics: ``metrics(params, state) -> {name: float}``: the task's
      held-out metrics at the same model as ``evaluate`` (None: no held-out
      data).
  """
  init: Callable[[], Any]
  step: Callable[..., Any]
  data: Any
  evaluate: Callable[[Any, Any], float]
  compile_seconds: float
  bytes_per_step: Optional[float] = None
  sync_every: int = 1
  metrics: Optional[Callable[[Any, Any], dict]] = None


def held_out_metrics(task: task_lib.Task) -> Optional[Callable[[Any], dict]]:
  """``metrics(params) -> {name: float}`` on the task's held-out data.

  One compiled function for all metrics; None when the task holds nothing
  out.
  """
  if task.eval_metrics is None or task.heldout is None:
    return None
  compiled = jax.jit(task.eval_metrics)
  return lambda params: {k: float(v)
                         for k, v in compiled(params, task.heldout).items()}


def _stepsize(state) -> Optional[float]:
  """The mean ``stepsize`` field of a state, if it has one."""
  try:
    value = optax.tree.get(state, "stepsize")
  except (KeyError, ValueError):  # several fields of that name
    return None
  if value is None:
    return None
  return float(np.mean(np.asarray(value)))


def apply_step(task: task_lib.Task, entry: opt_lib.Entry,
               tx: optax.GradientTransformationExtraArgs, params, state,
               batch):
  """One optimizer step on ``batch``: ``(params, state, loss)``.

  The loss goes to the optimizer as ``value=``; same-batch entries also get
  ``prev_grads=``, the batch's gradient at ALIAS's previous iterate.
  """
  loss, grads = jax.value_and_grad(task.loss)(params, batch)
  extra = {}
  if entry.same_batch:
    previous = optax_sign.alias_previous_params(params, state)
    extra["prev_grads"] = jax.grad(task.loss)(previous, batch)
  updates, state = tx.update(grads, state, params, value=loss, **extra)
  return optax.apply_updates(params, updates), state, loss


def single_worker_stepper(task: task_lib.Task, entry: opt_lib.Entry,
                          context: opt_lib.Context,
                          learning_rate: Optional[float]) -> Stepper:
  """Compiles one training step for one device."""
  tx = opt_lib.build(entry, learning_rate, context)

  def step(params, state, data, key):
    batch = task.sample(data, key)
    return apply_step(task, entry, tx, params, state, batch)

  def init():
    params = jax.tree.map(jnp.array, task.params)
    return params, tx.init(params)

  params, state = init()
  start = time.perf_counter()
  compiled = jax.jit(step).lower(params, state, task.data,
                                 jax.random.key(0)).compile()
  seconds = time.perf_counter() - start
  # The first call of an executable pays one-off costs: keep them out of the
  # timed runs.
  jax.block_until_ready(compiled(params, state, task.data, jax.random.key(0)))
  evaluate = jax.jit(task.eval_loss)
  held_out = held_out_metrics(task)
  return Stepper(init, compiled, task.data,
                 lambda p, s: float(evaluate(p, task.data)), seconds,
                 metrics=None if held_out is None else lambda p, s: held_out(p))


def train(stepper: Stepper, run: Run, steps: int, seed: int,
          log_every: int, progress: bool = True, desc: str = "",
          set_lr: Optional[float] = None) -> Run:
  """Runs ``steps`` steps from a fresh state and fills ``run``."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  params, state = stepper.init()
  if set_lr is not None:
    state = opt_lib.set_learning_rate(state, set_lr)
  run.compile_seconds = stepper.compile_seconds
  run.bytes_per_step = stepper.bytes_per_step
  run.sync_every = stepper.sync_every
  base_key = jax.random.key(seed)
  # fold_in runs eagerly in the loop: compile it now, not in the timed steps.
  jax.random.fold_in(base_key, 0)

  def record(t, elapsed):
    value = stepper.evaluate(params, state)
    run.steps.append(t)
    run.loss.append(value)
    run.seconds.append(elapsed)
    size = _stepsize(state)
    if size is not None:
      run.stepsize.append(size)
    if stepper.bytes_per_step is not None:
      run.bytes.append(stepper.bytes_per_step * (t // stepper.sync_every))
    if stepper.metrics is not None:
      for name, metric in stepper.metrics(params, state).items():
        run.metrics.setdefault(name, []).append(metric)
    return value

  record(0, 0.0)
  elapsed = 0.0
  bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False,
             mininterval=0.5)
  start = time.perf_counter()
  for t in range(1, steps + 1):
    params, state, _ = stepper.step(params, state, stepper.data,
                                    jax.random.fold_in(base_key, t))
    if t % log_every == 0 or t == steps:
      jax.block_until_ready(params)
      elapsed += time.perf_counter() - start
      value = record(t, elapsed)
      bar.set_postfix(loss=f"{value:.4g}", refresh=False)
      bar.update(t - bar.n)
      if not math.isfinite(value):
        run.diverged = True
        break
      start = time.perf_counter()
  bar.close()
  return run

