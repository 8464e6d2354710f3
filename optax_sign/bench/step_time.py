"""Update-step time and state size of ALIAS vs optax baselines.

Run ``python -m optax_sign.bench.step_time [--params 50e6] [--repeats 20]``.

Every optimizer is timed the same way: one ``jit`` of ``opt.update`` followed
by ``optax.apply_updates`` (the timed region holds nothing else: the gradient
is made once, outside), with parameters and state donated so the step can
update them in place, two warm-up calls, and ``block_until_ready`` on the
outputs. The optimizers are timed in turn within each repeat (round robin),
so a change of machine load hits all of them alike; times are medians (and
minima) over repeats, reported as ratios to ``optax.lion`` and to a
memory-copy floor (``params + 1`` in place), all in one process on one device.

Next to the times, two device-independent numbers from XLA's compiled step:
the bytes it reads and writes per parameter (``cost_analysis``; a model of
the passes: Lion must read g, m, p and write m, p, 20 B/param in float32) and
the temporary buffer it allocates per parameter (``memory_analysis``; on CPU
every fresh parameter-sized buffer costs page faults, often more than the
arithmetic).
"""

import argparse
import time
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sign


def _tree(num_params: float) -> Dict[str, jax.Array]:
  side = 2048
  rows = max(int(num_params) // (4 * side), 1)
  keys = jax.random.split(jax.random.key(0), 4)
  return {f"w{i}": jax.random.normal(k, (rows, side), jnp.float32)
          for i, k in enumerate(keys)}


def _local_steps(sync_every: int) -> optax.GradientTransformation:
  return optax_sign.local_steps(
      optax.adamw(1e-3), optax_sign.global_sign_momentum(), sync_every,
      inner_learning_rate=1e-3)


def _optimizers():
  """Name -> (optimizer or None for the copy floor, extra update kwargs)."""
  return {
      "copy floor": (None, {}),
      "alias_sign_sgd (full)": (optax_sign.alias_sign_sgd(), {}),
      "alias_sign_sgd (sign, tie=positive)": (optax_sign.alias_sign_sgd(
          memory="sign", tie="positive"), {}),
      "alias_sign_sgd (sign, tie=zero)": (optax_sign.alias_sign_sgd(
          memory="sign", tie="zero"), {}),
      "optax.sign_sgd": (optax.sign_sgd(1e-3), {}),
      "optax.lion": (optax.lion(1e-4), {}),
      "optax.adam": (optax.adam(1e-3), {}),
      "optax.adamw": (optax.adamw(1e-3), {}),
      "optax.contrib.prodigy": (optax.contrib.prodigy(), {}),
      # local_steps(adamw, global_sign_momentum): a non-sync and a sync step,
      # with the counter's sync loop and with sync= chosen on the host.
      "local_steps non-sync (counter)": (_local_steps(2**30), {}),
      "local_steps sync (counter)": (_local_steps(1), {}),
      "local_steps non-sync (sync=False)": (_local_steps(12), {"sync": False}),
      "local_steps sync (sync=True)": (_local_steps(12), {"sync": True}),
  }


def _step_fn(opt, extra):
  """The jitted step ``(params, state, grads) -> (params, state)``."""
  if opt is None:
    return jax.jit(lambda p, s, g: (jax.tree.map(lambda x: x + 1.0, p), s),
                   donate_argnums=(0,))

  def step(p, s, g):
    u, s = opt.update(g, s, p, value=jnp.float32(1.0), **extra)
    return optax.apply_updates(p, u), s
  return jax.jit(step, donate_argnums=(0, 1))


def _compiled_stats(step, args, n):
  """(bytes accessed per param, temporary bytes per param) of the step."""
  compiled = step.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  accessed = float((cost or {}).get("bytes accessed", float("nan")))
  memory = compiled.memory_analysis()
  temp = float(memory.temp_size_in_bytes) if memory is not None else float(
      "nan")
  return accessed / n, temp / n


def _selected(name: str, only) -> bool:
  always = ("copy floor", "optax.lion", "optax.adamw")
  return only is None or name in always or any(t in name for t in only)


def main(argv=None) -> Dict[str, Dict[str, float]]:
  """Prints a table and returns, per optimizer, "ms" (median), "min_ms",
  "vs_lion", "vs_adamw", "vs_copy", "bytes_per_param" (state), "accessed_per_param" and
  "temp_per_param" (XLA's counts for the compiled step)."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--params", type=float, default=50e6)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument(
      "--only", nargs="*", default=None, metavar="TEXT",
      help="time only the optimizers whose names contain one of these "
      "texts (the copy floor, optax.lion and optax.adamw always run)")
  args = parser.parse_args(argv)
  params = _tree(args.params)
  n = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda x: 1e-3 * x + 1e-4, params)
  runs, results = {}, {}
  for name, (opt, extra) in _optimizers().items():
    if not _selected(name, args.only):
      continue
    step = _step_fn(opt, extra)
    state = () if opt is None else jax.tree.map(jnp.copy, opt.init(params))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    carry = (jax.tree.map(jnp.copy, params), state)  # no shared buffers
    accessed, temp = _compiled_stats(step, carry + (grads,), n)
    for _ in range(2):  # compile and warm up
      carry = step(*carry, grads)
      jax.block_until_ready(carry)
    runs[name] = [step, carry, []]
    results[name] = {"bytes_per_param": nbytes / n,
                     "accessed_per_param": accessed, "temp_per_param": temp}
  for _ in range(args.repeats):
    for run in runs.values():
      step, carry, times = run
      start = time.perf_counter()
      carry = step(*carry, grads)
      jax.block_until_ready(carry)
      times.append(time.perf_counter() - start)
      run[1] = carry
  for name, (_, _, times) in runs.items():
    results[name]["ms"] = 1e3 * float(np.median(times))
    results[name]["min_ms"] = 1e3 * float(np.min(times))
  for r in results.values():
    r["vs_lion"] = r["ms"] / results["optax.lion"]["ms"]
    r["vs_adamw"] = r["ms"] / results["optax.adamw"]["ms"]
    r["vs_copy"] = r["ms"] / results["copy floor"]["ms"]
  device = jax.devices()[0].device_kind
  print(f"update step, {n / 1e6:.1f}M float32 params, {device}, "
        f"median (min) of {args.repeats} round-robin repeats")
  print(f"{'optimizer':37s} {'ms':>8s} {'(min)':>8s} {'x lion':>7s} "
        f"{'x adamw':>7s} {'x copy':>7s} {'state B/p':>10s} {'XLA B/p':>8s} "
        f"{'temp B/p':>9s}")
  for name, r in results.items():
    print(f"{name:37s} {r['ms']:8.2f} {r['min_ms']:8.2f} {r['vs_lion']:7.2f} "
          f"{r['vs_adamw']:7.2f} {r['vs_copy']:7.2f} {r['bytes_per_param']:10.3f} "
          f"{r['accessed_per_param']:8.2f} {r['temp_per_param']:9.2f}")
  return results


if __name__ == "__main__":
  main()
