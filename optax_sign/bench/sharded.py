"""Compressed data parallelism in a jitted step: bytes per mesh axis and time.

``python -m optax_sign.bench.sharded [--width W] [--repeats R]`` builds a
two-layer MLP tree (kernels, biases and norm scales) on 8 simulated CPU
devices in three layouts, data parallel (``data=8``), tensor parallel plus
data parallel (``data=4, model=2``, kernels sharded over ``model``, biases
and scales replicated) and FSDP over the workers (``data=8``, kernels
sharded along their leading dimension over ``data``), and compares, in one
process:

The tensor-parallel layout runs once with Explicit and once with Auto mesh
axes. Methods:

* ``fp32 all-reduce``: the plain GSPMD step, ``jax.grad`` of the global loss
  and ``optax.sgd`` (the compiler all-reduces float32 gradients; under FSDP
  it also all-gathers the parameters);
* the library's aggregators through :func:`optax_sign.data_parallel` and
  :func:`optax_sign.worker_value_and_grad` (majority vote by each transport,
  mean of signs, error feedback; under FSDP the shard-aligned vote,
  :func:`optax_sign.sharded_majority_vote`, for either tie policy).

For each it prints the bytes sent per worker per parameter per step over
each mesh axis, read from the compiled HLO (:func:`optax_sign.
communication_bytes`), the part of them that is a float32 all-gather (the
FSDP parameter gather), and the median step time relative to the plain step
(interleaved repeats, compile excluded). It must start in a fresh process (it
asks JAX for 8 CPU devices before JAX initializes).
"""

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List

import jax

_EXPLICIT, _AUTO = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
# Layout: (data, model, axis type, FSDP over data).
LAYOUTS = {"DP data=8": (8, 1, _EXPLICIT, False),
           "TP+DP data=4 model=2, Explicit": (4, 2, _EXPLICIT, False),
           "TP+DP data=4 model=2, Auto": (4, 2, _AUTO, False),
           "FSDP data=8": (8, 1, _EXPLICIT, True)}


def _methods(fsdp: bool) -> Dict[str, Callable]:
  import optax  # pylint: disable=g-import-not-at-top
  import optax_sign  # pylint: disable=g-import-not-at-top
  lr = optax.scale_by_learning_rate(1e-3)
  if fsdp:
    sharded = lambda tie: lambda axis: optax.chain(
        optax_sign.sharded_majority_vote(axis, tie=tie), lr)
    return {"sharded vote (tie=positive)": sharded("positive"),
            "sharded vote (tie=zero)": sharded("zero")}
  vote = lambda t: lambda axis: optax.chain(
      optax_sign.majority_vote(axis, transport=t), lr)
  return {
      "vote (alltoall)": vote("alltoall"),
      "vote (psum)": vote("psum"),
      "vote (allgather)": vote("allgather"),
      "mean of signs": lambda axis: optax.chain(
          optax_sign.mean_of_signs(axis), lr),
      "error feedback": lambda axis: optax.chain(
          optax_sign.scale_by_error_feedback_sign(axis_name=axis), lr),
  }


def _model(width: int, mesh, fsdp: bool):
  """Params (placed), their PartitionSpecs and the loss of a 2-layer MLP."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  k = jax.random.split(jax.random.key(0), 2)
  params = {"w1": jax.random.normal(k[0], (width, 4 * width)) / width ** 0.5,
            "b1": jnp.zeros(4 * width), "scale": jnp.ones(width),
            "w2": jax.random.normal(k[1], (4 * width, width)) / width ** 0.5,
            "b2": jnp.zeros(width)}
  specs = {"w1": P(None, "model"), "b1": P("model"), "scale": P(),
           "w2": P("model", None), "b2": P()}
  if fsdp:
    specs.update(w1=P("data"), b1=P(), w2=P("data"))
  params = jax.device_put(
      params, {n: NamedSharding(mesh, s) for n, s in specs.items()})

  def loss(params, x):
    h = jax.nn.relu(x * params["scale"] @ params["w1"] + params["b1"])
    # Sharded like the batch (an Explicit "model" axis needs it said).
    out = jnp.matmul(h, params["w2"], out_sharding=jax.typeof(x).sharding)
    return jnp.mean((out + params["b2"] - x) ** 2)

  return params, loss


def _steps(width: int, data: int, model: int, kind, fsdp: bool):
  """{method: (jitted step, args)} for one layout."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import optax_sign  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((data, model), ("data", "model"),
                       axis_types=(kind, kind))
  params, loss = _model(width, mesh, fsdp)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (8 * data, width)),
                     NamedSharding(mesh, P("data")))
  sgd = optax.sgd(1e-3)

  @jax.jit
  def plain(params, state, x):
    updates, state = sgd.update(jax.grad(loss)(params, x), state, params)
    return optax.apply_updates(params, updates), state

  steps = {"fp32 all-reduce": (plain, (params, sgd.init(params), x))}
  for name, make in _methods(fsdp).items():
    tx = optax_sign.data_parallel(make("data"), "data", mesh=mesh)

    @jax.jit
    def step(params, state, x, tx=tx):
      grads = optax_sign.worker_grad(loss, "data", mesh=mesh)(params, x)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    steps[name] = (step, (params, tx.init(params), x))
  return steps, sum(p.size for p in jax.tree.leaves(params)), mesh


def _median_times(steps, repeats: int) -> Dict[str, float]:
  """Median seconds per step, methods interleaved, after a compile call."""
  times: Dict[str, List[float]] = {name: [] for name in steps}
  for step, args in steps.values():
    jax.block_until_ready(step(*args))
  for _ in range(repeats):
    for name, (step, args) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def measure(width: int = 256, repeats: int = 20) -> List[dict]:
  """Rows of {layout, method, bytes per param per axis, time ratio}."""
  import optax_sign  # pylint: disable=g-import-not-at-top
  rows = []
  for layout, (data, model, kind, fsdp) in LAYOUTS.items():
    steps, size, mesh = _steps(width, data, model, kind, fsdp)
    with jax.set_mesh(mesh):
      times = _median_times(steps, repeats)
      reports = {name: optax_sign.communication_bytes(step, *args)
                 for name, (step, args) in steps.items()}
    for name in steps:
      by_axes = reports[name].bytes_by_axes()
      rows.append(dict(
          layout=layout, method=name, params=size,
          data=sum(b for a, b in by_axes.items() if "data" in a) / size,
          gather=sum(c.bytes_sent for c in reports[name].collectives
                     if "data" in c.axes and c.op == "all-gather"
                     and c.dtype == "f32") / size,
          model=sum(b for a, b in by_axes.items() if a == ("model",)) / size,
          time=times[name] / times["fp32 all-reduce"]))
  return rows


def format_table(rows: List[dict]) -> str:
  lines = ["| layout | method | B/param over data | of which f32 all-gather "
           "| B/param over model only | step time vs fp32 all-reduce |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['layout']} | {r['method']} | {r['data']:.4f} | "
                 f"{r['gather']:.4f} | {r['model']:.4f} | {r['time']:.2f}x |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=256,
                      help="MLP width W; 8 W^2 + 6 W parameters (default 256)")
  parser.add_argument("--repeats", type=int, default=20,
                      help="timed steps per method (default 20)")
  args = parser.parse_args(argv)
  if args.width < 8 or args.width % 8:
    parser.error("--width must be a positive multiple of 8")
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  jax.config.update("jax_num_cpu_devices", 8)
  rows = measure(args.width, args.repeats)
  print(f"{rows[0]['params']} parameters, 8 simulated CPU devices "
        f"({jax.default_backend()}); bytes sent per worker per parameter per "
        "step from the compiled HLO")
  print(format_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
