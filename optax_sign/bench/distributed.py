"""Multi-worker runs on N simulated CPU devices with ``jax.shard_map``.

Every worker holds its own copy of the parameters and of the optimizer state,
stacked on a leading worker axis and sharded with ``P("workers")``, so the
parameters enter ``jax.grad`` device-varying and the gradient is each worker's
own (no hidden full-precision all-reduce, see DESIGN.md "the shard_map gradient
trap"). Each worker draws its own mini-batch (the step key is folded with the
worker index). Only the optimizer communicates, so the collectives in the
compiled step are exactly the optimizer's; their bytes come from
:func:`optax_sign.communication_bytes`. Local-steps methods are evaluated at
their anchor (:func:`optax_sign.local_steps_anchor`), the others at worker 0's
parameters.
"""

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import optax_sign

from optax_sign.bench import optimizers as opt_lib
from optax_sign.bench import runner
from optax_sign.bench import tasks as task_lib

AXIS = opt_lib.AXIS


def request_devices(n: int) -> None:
  """Asks JAX for ``n`` CPU devices (only possible before JAX starts)."""
  try:
    if jax.config.jax_num_cpu_devices < n:  # type: ignore[attr-defined]
      jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # the backend is already up; make_mesh reports what is missing


def make_mesh(n: int) -> jax.sharding.Mesh:
  """A one-axis mesh of ``n`` CPU devices named ``workers``."""
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ValueError(
        f"--workers {n} needs {n} CPU devices but JAX has {len(devices)}; "
        "start a fresh process (the CLI sets jax_num_cpu_devices before JAX "
        "starts) or set XLA_FLAGS=--xla_force_host_platform_device_count="
        f"{n}")
  return jax.sharding.Mesh(np.array(devices[:n]), (AXIS,))


def step_bytes(compiled: jax.stages.Compiled) -> float:
  """Bytes one worker sends in one call of the ``compiled`` step.

  The accounting of :func:`optax_sign.communication_bytes`, applied to the
  text of the step already compiled (a second compilation would double the
  set-up time of every multi-worker run).
  """
  text = compiled.as_text()
  if text is None:
    raise ValueError("the compiled step has no HLO text to count bytes in")
  report = optax_sign._wire.parse_collectives(text)  # pylint: disable=protected-access
  return float(report.total_bytes)


def multi_worker_stepper(task: task_lib.Task, entry: opt_lib.Entry,
                         context: opt_lib.Context,
                         learning_rate: Optional[float],
                         mesh: jax.sharding.Mesh) -> runner.Stepper:
  """Compiles one step of N workers under ``shard_map``."""
  n = mesh.shape[AXIS]
  tx = opt_lib.build(entry, learning_rate, context)
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  stack = lambda tree: jax.tree.map(lambda x: x[None], tree)

  def worker_init(params):
    return stack(tx.init(first(params)))

  def worker_step(params, state, data, key):
    params, state = first(params), first(state)
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
    batch = task.sample(data, key)
    params, state, loss = runner.apply_step(task, entry, tx, params, state,
                                            batch)
    return stack(params), stack(state), loss[None]

  worker = P(AXIS)
  shard_init = jax.jit(jax.shard_map(worker_init, mesh=mesh, in_specs=worker,
                                     out_specs=worker))
  step = jax.jit(jax.shard_map(worker_step, mesh=mesh,
                               in_specs=(worker, worker, P(), P()),
                               out_specs=(worker, worker, worker)))
  sharding = jax.sharding.NamedSharding(mesh, worker)
  replicated = jax.sharding.NamedSharding(mesh, P())
  data = jax.device_put(task.data, replicated)

  def init():
    params = jax.tree.map(
        lambda x: jax.device_put(jnp.broadcast_to(x, (n,) + x.shape), sharding),
        task.params)
    return params, shard_init(params)

  params, state = init()
  key = jax.random.key(0)
  start = time.perf_counter()
  compiled = step.lower(params, state, data, key).compile()
  seconds = time.perf_counter() - start
  # The first call of an executable pays one-off costs: keep them out of the
  # timed runs.
  jax.block_until_ready(compiled(params, state, data, jax.random.key(0)))
  per_step = step_bytes(compiled)
  evaluate = jax.jit(task.eval_loss)
  held_out = runner.held_out_metrics(task)

  def model(params, state):
    if entry.local_steps:
      return first(optax_sign.local_steps_anchor(state))
    return first(params)

  return runner.Stepper(
      init, compiled, data,
      lambda p, s: float(evaluate(model(p, s), task.data)), seconds,
      bytes_per_step=per_step, sync_every=entry.sync_every,
      metrics=None if held_out is None
      else lambda p, s: held_out(model(p, s)))
