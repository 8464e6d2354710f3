"""data_parallel across 2 processes x 4 CPU devices equals 1 process x 8.

A 2D Explicit mesh ``data=4 x model=2``: the worker axis spans both
processes (workers 0-1 on process 0, 2-3 on process 1) and the model axis
stays within a process. A tensor-parallel MLP trains for a few steps with
majority-vote Sign-SGD through ``worker_value_and_grad`` and ``data_parallel``
in a jitted step, with replicated kernels and with kernels sharded over the
worker axis too (FSDP, the shard-aligned vote); the final parameters must
equal, bit for bit, those of the same run on the 8 local devices of this
process, and the FSDP run those of the replicated vote.
"""

import jax
import numpy as np

import distributed_launch

_STEPS = 5
_SPECS = {"w1": (None, "model"), "b1": ("model",), "w2": ("model", None),
          "b2": ()}
# FSDP over the worker axis (across the processes) with the sharded vote.
_FSDP_SPECS = {"w1": ("data", "model"), "b1": ("model",), "w2": ("data", None),
               "b2": ()}


def _mesh():
  return jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def _problem():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(16, 32)) * 0.3, "b1": np.zeros(32),
            "w2": rng.normal(size=(32, 4)) * 0.3, "b2": np.zeros(4)}
  x, y = rng.normal(size=(64, 16)), rng.normal(size=(64, 4))
  cast = lambda t: {k: np.asarray(v, np.float32) for k, v in t.items()}
  return cast(params), np.float32(x), np.float32(y)


def train(mesh):
  """Trains on ``mesh``; returns {transport/leaf: final parameters}."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import optax_sign  # pylint: disable=g-import-not-at-top

  def loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    out = jnp.matmul(h, params["w2"], out_sharding=jax.typeof(x).sharding)
    return jnp.mean((out + params["b2"] - y) ** 2)

  def place(value, spec):
    return distributed_launch.global_array(value, mesh, P(*spec))

  params0, x, y = _problem()
  x, y = place(x, ("data",)), place(y, ("data",))
  gather = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))
  results = {}
  votes = {t: (optax_sign.majority_vote("data", transport=t), _SPECS)
           for t in ("psum", "alltoall")}
  votes["fsdp"] = (optax_sign.sharded_majority_vote("data"), _FSDP_SPECS)
  for transport, (vote, specs) in votes.items():
    tx = optax_sign.data_parallel(
        optax.chain(vote, optax.scale_by_learning_rate(0.01)), "data",
        mesh=mesh)
    params = {k: place(v, specs[k]) for k, v in params0.items()}

    @jax.jit
    def step(params, state, x, y, tx=tx):
      grads = optax_sign.worker_grad(loss, "data", mesh=mesh)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(_STEPS):
      params, state = jax.block_until_ready(step(params, state, x, y))
    for k, v in gather(params).items():
      results[f"{transport}/{k}"] = np.asarray(v.addressable_data(0))
  return results


def test_two_processes_match_one_process_bitwise(tmp_path):
  expected = train(_mesh())
  for got in distributed_launch.launch(__file__, tmp_path,
                                       devices_per_process=4):
    for key, value in expected.items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert not np.array_equal(expected["psum/w1"], _problem()[0]["w1"])
  for k in _SPECS:  # tie="zero" either way: the same votes
    np.testing.assert_array_equal(expected[f"fsdp/{k}"], expected[f"psum/{k}"])


if __name__ == "__main__":
  distributed_launch.worker_main(train, _mesh)
