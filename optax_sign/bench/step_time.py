"""Update-step time and state size of ALIAS vs optax baselines.

Run ``python -m optax_sign.bench.step_time [--params 50e6] [--repeats 20]``.
Every optimizer updates the same float32 pytree (a few large matrices) under
``jit`` with donated parameters and state; times are medians over repeats and
are reported as ratios to ``optax.lion`` and to a memory-copy floor
(``params + 1``), all measured in one process on one device.
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


def _optimizers():
  return {
      "copy floor": None,
      "alias_sign_sgd (full)": optax_sign.alias_sign_sgd(),
      "alias_sign_sgd (sign, tie=positive)": optax_sign.alias_sign_sgd(
          memory="sign", tie="positive"),
      "optax.lion": optax.lion(1e-4),
      "optax.adam": optax.adam(1e-3),
      "optax.contrib.prodigy": optax.contrib.prodigy(),
  }


def _time(fn, args, repeats):
  args = fn(*args)
  jax.block_until_ready(args)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    args = fn(*args)
    jax.block_until_ready(args)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv=None) -> Dict[str, Dict[str, float]]:
  """Prints a table and returns {name: {"ms", "vs_lion", "vs_copy", "bytes_per_param"}}."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--params", type=float, default=50e6)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  params = _tree(args.params)
  n = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda x: 1e-3 * x + 1e-4, params)
  results = {}
  for name, opt in _optimizers().items():
    if opt is None:
      step = jax.jit(lambda p, s, g: (jax.tree.map(lambda x: x + 1.0, p), s),
                     donate_argnums=(0,))
      state, nbytes = (), 0
    else:
      def step(p, s, g, opt=opt):
        u, s = opt.update(g, s, p, value=jnp.float32(1.0))
        return optax.apply_updates(p, u), s
      step = jax.jit(step, donate_argnums=(0, 1))
      state = jax.tree.map(jnp.copy, opt.init(params))  # no shared buffers
      nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    p = jax.tree.map(jnp.copy, params)
    seconds = _time(lambda p, s: step(p, s, grads), (p, state), args.repeats)
    results[name] = {"ms": 1e3 * seconds, "bytes_per_param": nbytes / n}
    del p, state
  for r in results.values():
    r["vs_lion"] = r["ms"] / results["optax.lion"]["ms"]
    r["vs_copy"] = r["ms"] / results["copy floor"]["ms"]
  device = jax.devices()[0].device_kind
  print(f"update step, {n / 1e6:.1f}M float32 params, {device}, "
        f"median of {args.repeats}")
  print(f"{'optimizer':40s} {'ms':>9s} {'x lion':>8s} {'x copy':>8s} "
        f"{'state B/param':>14s}")
  for name, r in results.items():
    print(f"{name:40s} {r['ms']:9.2f} {r['vs_lion']:8.2f} {r['vs_copy']:8.2f} "
          f"{r['bytes_per_param']:14.3f}")
  return results


if __name__ == "__main__":
  main()
