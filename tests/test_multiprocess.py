"""Majority vote across 2 processes x 2 CPU devices equals 1 process x 4.

The test launches this file as a script in two subprocesses that join one
``jax.distributed`` runtime on 127.0.0.1 (gloo CPU collectives) and train a
small linear model with majority-vote Sign-SGD on the 4 global devices, once
per transport; the final parameters must equal, bit for bit, those of the same
run on 4 local devices of this process.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
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
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import optax_sign  # pylint: disable=g-import-not-at-top

  def place(value, spec):
    value = np.asarray(value)
    return jax.make_array_from_callback(
        value.shape, NamedSharding(mesh, spec), lambda index: value[index])

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


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_bitwise(tmp_path):
  local_mesh = jax.make_mesh((_WORKERS,), ("x",),
                             axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:_WORKERS])
  expected = train(local_mesh)
  port = str(_free_port())
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [_HERE, os.path.dirname(_HERE), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, __file__, str(i), port, str(tmp_path / f"w{i}.npz")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  for i in range(2):
    got = np.load(tmp_path / f"w{i}.npz")
    for transport, w in expected.items():
      np.testing.assert_array_equal(got[transport], w, err_msg=transport)
  assert not np.array_equal(expected["psum"], np.zeros(6))


if __name__ == "__main__":
  pid, coordinator_port, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{coordinator_port}", num_processes=2,
                             process_id=pid)
  assert jax.device_count() == _WORKERS, jax.devices()
  global_mesh = jax.make_mesh((_WORKERS,), ("x",),
                              axis_types=(jax.sharding.AxisType.Auto,))
  np.savez(out_path, **train(global_mesh))
  jax.distributed.shutdown()
