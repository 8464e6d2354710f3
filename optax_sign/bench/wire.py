"""Bytes on the wire per parameter per step for each vote transport.

``python -m optax_sign.bench.wire [--size D] [--workers 2 4 8 16 64]`` compiles
the majority vote of a ``D``-parameter vector under ``jax.shard_map`` on
simulated CPU devices, reads the collectives from the compiled HLO with
:func:`optax_sign.communication_bytes`, and prints bytes sent per worker per
parameter next to the formula (:func:`optax_sign.vote_bytes`) and next to an
fp32 ``pmean`` of gradients. The ``auto`` rows show the choice of the
interconnect cost model (GPU, TPU: fewest bytes), the one bytes decide; on CPU
devices ``"auto"`` picks by measured time instead
(:func:`optax_sign.select_transport`). It must start in a fresh
process: it asks JAX for as many CPU devices as the largest worker count
before JAX initializes.
"""

import argparse
import sys
from typing import List, Sequence

import jax

_TRANSPORTS = ("psum", "allgather", "alltoall", "auto")
_TIES = ("positive", "zero")


def _mesh(n: int):
  return jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def measure(workers: Sequence[int], size: int) -> List[dict]:
  """Rows of {workers, scheme, tie, hlo, formula} in bytes per parameter."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import optax_sign  # pylint: disable=g-import-not-at-top
  from optax_sign import _communication  # pylint: disable=g-import-not-at-top

  rows = []
  for n in workers:
    if n > jax.device_count():
      print(f"skipping N={n}: only {jax.device_count()} devices",
            file=sys.stderr)
      continue
    arg = jax.ShapeDtypeStruct((n, size), jnp.float32)
    pmean = jax.shard_map(lambda g: jax.lax.pmean(g[0], "x"), mesh=_mesh(n),
                          in_specs=P("x"), out_specs=P())
    rows.append(dict(workers=n, scheme="fp32 pmean", tie="-",
                     hlo=optax_sign.communication_bytes(pmean, arg).total_bytes
                     / size, formula=8 * (n - 1) / n))
    for tie in _TIES:
      for transport in _TRANSPORTS:
        chosen = (transport if transport != "auto" else
                  _communication.select_transport("gpu", n, size, tie))
        vote = jax.shard_map(
            lambda g, t=chosen, tie=tie: optax_sign.vote_signs(
                g[0], "x", tie=tie, transport=t),
            mesh=_mesh(n), in_specs=P("x"), out_specs=P())
        report = optax_sign.communication_bytes(vote, arg)
        rows.append(dict(
            workers=n, tie=tie,
            scheme=transport if transport != "auto" else f"auto ({chosen})",
            hlo=report.total_bytes / size,
            formula=optax_sign.vote_bytes(chosen, n, size, tie) / size))
  return rows


def format_table(rows: Sequence[dict]) -> str:
  lines = [f"{'N':>3}  {'scheme':<20} {'tie':<9} {'HLO B/param':>12} "
           f"{'formula':>9} {'vs fp32':>8}"]
  baseline = {}
  for r in rows:
    if r["scheme"] == "fp32 pmean":
      baseline[r["workers"]] = r["hlo"]
    ratio = baseline[r["workers"]] / r["hlo"] if r["hlo"] else float("inf")
    lines.append(f"{r['workers']:>3}  {r['scheme']:<20} {r['tie']:<9} "
                 f"{r['hlo']:>12.4f} {r['formula']:>9.4f} {ratio:>7.1f}x")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=1 << 18,
                      help="parameters d (default 262144)")
  parser.add_argument("--workers", type=int, nargs="+",
                      default=[2, 4, 8, 16, 64])
  args = parser.parse_args(argv)
  jax.config.update("jax_num_cpu_devices", max(args.workers))
  print(f"bytes sent per worker per parameter per step, d={args.size}, "
        f"simulated CPU devices ({jax.default_backend()})")
  print(format_table(measure(args.workers, args.size)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
