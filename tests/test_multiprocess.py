"""Majority vote across 2 processes x 2 CPU devices equals 1 process x 4.

The test launches this file as a script in two subprocesses that join one
``jax.distributed`` runtime on 127.0.0.1 (gloo CPU collectives) and train a
small linear model with majority-vote Sign-SGD on the 4 global devices, once
per transport; the final parameters must equal, bit for bit, those of the same
run on 4 local devices of this process.
"""

import jax
import numpy as np

import distributed_launch

_WORKERS = 4
_STEPS = 20
_TRANSPORTS = ("psum", "allgather", "alltoall")


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(_WORKERS, 8, 6)).astype(np.float32)
  y = (x @ np.linspace(-1, 1, 6) + 0.1 * rng.normal(size=(_WORKERS, 8)))
  return x, y.astype(np.float32)


def train(mesh):
  """Trains on ``mesh`` (4 workers); returns {transport: final weights}."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import optax_sign  # pylint: disable=g-import-not-at-top

  def place(value, spec):
    return distributed_launch.global_array(value, mesh, spec)

  x, y = (place(a, P("x")) for a in _problem())
  results = {}
  for transport in _TRANSPORTS:
    opt = optax.chain(optax_sign.majority_vote("x", transport=transport),
                      optax.scale_by_learning_rate(0.05))

    def local(w, x, y, opt=opt):
      state = opt.init(w)

      def body(carry, _):
        w, state = carry
        loss = lambda v: jnp.mean((x[0] @ v - y[0]) ** 2)
        g = jax.grad(loss)(optax_sign.per_worker(w, "x"))
        u, state = opt.update(g, state, w)
        return (optax.apply_updates(w, u), state), None

      (w, _), _ = jax.lax.scan(body, (w, state), None, length=_STEPS)
      return w

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("x"), P("x")),
                               out_specs=P()))
    w = fn(place(np.zeros(6, np.float32), P()), x, y)
    results[transport] = np.asarray(w.addressable_data(0))
  return results


def test_two_processes_match_one_process_bitwise(tmp_path):
  local_mesh = jax.make_mesh((_WORKERS,), ("x",),
                             axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:_WORKERS])
  expected = train(local_mesh)
  for got in distributed_launch.launch(__file__, tmp_path):
    for transport, w in expected.items():
      np.testing.assert_array_equal(got[transport], w, err_msg=transport)
  assert not np.array_equal(expected["psum"], np.zeros(6))


if __name__ == "__main__":
  distributed_launch.worker_main(train)
