"""Majority-vote step time next to an fp32 ``pmean`` step, per transport.

``python -m optax_sign.bench.vote_time [--dim 10e6] [--workers 8]
[--repeats 10]`` times, on ``--workers`` simulated CPU devices in one
process, one ``jax.jit(jax.shard_map(...))`` step per worker on a
``--dim``-coordinate float32 gradient:

* ``fp32 pmean``: ``lax.pmean`` of the gradient, the reference;
* ``copy floor``: ``2 * g``, one read and one write of the gradient, the
  least any step costs;
* ``vote T``: ``majority_vote("x", transport=T, tie=...).update`` for each
  transport and the two tie policies ``"positive"`` and ``"zero"`` (one and
  two bit planes);
* ``collective T``: the same transport's collectives alone, on messages of
  the sizes the vote sends (int8 counts or packed bytes), so that ``vote T``
  minus ``collective T`` is about the vote's compute (signs, packing,
  counting, unpacking).

The gradient is donated and each step's output is the next step's input, so
a step writes in place: without donation every step also pays the page faults
of a fresh gradient-sized buffer (glibc maps buffers over 32 MiB afresh), and
at d = 10M even the copy floor then cost 0.9x the pmean. Programs are timed in turn
within each repeat (round robin), blocking on each step; the table gives
medians (and minima) and ratios to the ``pmean`` median. It must start in a
fresh process, as it asks JAX for the CPU devices before JAX initializes.
"""

import argparse
import time
from typing import Callable, Dict, Tuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

import optax_sign
from optax_sign import _communication

TIES = ("positive", "zero")
TRANSPORTS = ("psum", "allgather", "alltoall", "auto")


def _collectives(transport: str, n: int, d: int, tie: str):
  """(per-worker step, (shape, dtype) of its local message): a transport's
  collectives alone, on messages of the vote's sizes."""
  planes = 2 if tie == "zero" else 1
  if transport == "psum":
    return ((lambda m: lax.psum(m, "x")),
            ((d,), _communication.count_dtype(n)))
  if transport == "allgather":
    return ((lambda m: _communication.gather_invariant(m, "x")),
            ((planes * -(-d // 8),), jnp.uint8))
  chunk = planes * -(-d // (8 * n))
  return ((lambda m: _communication.gather_invariant(
      lax.all_to_all(m, "x", 0, 0, tiled=True)[0], "x")),
          ((n, chunk), jnp.uint8))


def _programs(n: int, d: int) -> Dict[str, Tuple[Callable, str, str, bool]]:
  """Name -> (per-worker step, tie, transport, acts on the gradient)."""
  progs: Dict[str, Tuple[Callable, str, str, bool]] = {
      "fp32 pmean": (lambda g: lax.pmean(g, "x"), "-", "-", True),
      "copy floor": (lambda g: 2.0 * g, "-", "-", True)}
  for tie in TIES:
    for transport in TRANSPORTS:
      tx = optax_sign.majority_vote("x", transport=transport, tie=tie)
      progs[f"vote {transport} ({tie})"] = (
          lambda g, tx=tx: tx.update(g, tx.init(g))[0], tie, transport, True)
    for transport in TRANSPORTS[:3]:
      step, _ = _collectives(transport, n, d, tie)
      progs[f"collective {transport} ({tie})"] = (step, tie, transport, False)
  return progs


def _compile(step, mesh, on_gradient: bool):
  """The jitted shard_map of ``step``; the gradient is donated."""
  fn = jax.shard_map(lambda x: step(x if on_gradient else x[0]), mesh=mesh,
                     in_specs=P("x"), out_specs=P("x") if on_gradient else P())
  return jax.jit(fn, donate_argnums=(0,) if on_gradient else ())


def measure(dim: int, workers: int, repeats: int) -> Dict[str, dict]:
  """Per program: "tie", "transport", "ms" (median), "min_ms", "x_pmean"."""
  n, d = workers, dim
  mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])
  sharding = jax.NamedSharding(mesh, P("x"))
  grad = jax.device_put(
      jax.random.normal(jax.random.key(0), (n * d,), jnp.float32), sharding)
  programs = _programs(n, d)
  runs: Dict[str, list] = {}
  for name, (step, tie, transport, on_gradient) in programs.items():
    message = None
    if not on_gradient:
      _, (shape, dtype) = _collectives(transport, n, d, tie)
      message = jax.device_put(jnp.ones((n,) + shape, dtype), sharding)
    runs[name] = [_compile(step, mesh, on_gradient), message, []]
  for repeat in range(repeats + 2):  # two warm-up rounds (compilation)
    for fn, message, times in runs.values():
      start = time.perf_counter()
      if message is None:  # in place: the output is the next input
        grad = jax.block_until_ready(fn(grad))
      else:
        jax.block_until_ready(fn(message))
      if repeat >= 2:
        times.append(time.perf_counter() - start)
  base = float(np.median(runs["fp32 pmean"][2]))
  return {name: dict(tie=programs[name][1], transport=programs[name][2],
                     ms=1e3 * float(np.median(times)),
                     min_ms=1e3 * float(np.min(times)),
                     x_pmean=float(np.median(times)) / base)
          for name, (_, _, times) in runs.items()}


def format_table(rows: Dict[str, dict]) -> str:
  lines = [f"{'step':32s} {'ms':>9s} {'(min)':>9s} {'x pmean':>8s}"]
  for name, r in rows.items():
    lines.append(f"{name:32s} {r['ms']:9.2f} {r['min_ms']:9.2f} "
                 f"{r['x_pmean']:8.3f}")
  return "\n".join(lines)


def main(argv=None) -> dict:
  """Prints the table; returns {"dim", "workers", "repeats", "backend",
  "auto" (tie -> chosen transport), "rows" (see :func:`measure`)}."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dim", type=float, default=10e6,
                      help="coordinates d per worker (default 1e7)")
  parser.add_argument("--workers", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.workers)
  d, n = int(args.dim), args.workers
  rows = measure(d, n, args.repeats)
  auto = {tie: _communication.choose_transport("auto", n, d, tie)
          for tie in TIES}
  print(f"vote step, d={d:,} float32, N={n} simulated CPU devices, "
        f"median (min) of {args.repeats} round-robin repeats; auto: "
        + ", ".join(f"{t} -> {c}" for t, c in auto.items()))
  print(format_table(rows))
  return dict(dim=d, workers=n, repeats=args.repeats,
              backend=jax.default_backend(), auto=auto, rows=rows)


if __name__ == "__main__":
  main()
