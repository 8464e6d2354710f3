"""Aggregators inside a fully manual shard_map over a data x model mesh.

A tensor-parallel tree mixes a model-sharded kernel with a bias replicated
over "model" (as every real model does): each group of leaves goes in its own
collective, the outputs keep their layouts, and the results equal an
unsharded NumPy / named-vmap reference.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import optax_sign

N = 4
# Per-worker gradients stacked along axis 0: worker i holds rows of block i.
GRAD_SPECS = {"w": P("data", "model"), "b": P("data")}
OUT_SPECS = {"w": P(None, "model"), "b": P()}


def _mesh():
  return jax.make_mesh((N, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def _grads(seed, integers=True):
  rng = np.random.default_rng(seed)
  draw = ((lambda s: rng.integers(-2, 3, s)) if integers
          else rng.standard_normal)
  return {"w": draw((N, 16, 8)).astype(np.float32),
          "b": draw((N, 8)).astype(np.float32)}


def _tsign(x):
  return np.sign(x)


def _manual(fn, in_specs, out_specs):
  return jax.jit(jax.shard_map(fn, mesh=_mesh(), in_specs=in_specs,
                               out_specs=out_specs))


def _place(tree, specs):
  mesh = _mesh()
  return jax.device_put(
      tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


@pytest.mark.parametrize("transport", ["psum", "allgather", "alltoall", "auto"])
def test_vote_over_mixed_replication_matches_numpy(transport):
  grads = _grads(0)
  stacked = {"w": grads["w"].reshape(N * 16, 8), "b": grads["b"].reshape(-1)}
  vote = _manual(
      lambda g: optax_sign.vote_signs(g, "data", transport=transport),
      (GRAD_SPECS,), OUT_SPECS)(_place(stacked, GRAD_SPECS))
  for k in grads:
    expected = _tsign(_tsign(grads[k]).sum(0))
    np.testing.assert_array_equal(np.asarray(vote[k]), expected)
  assert vote["w"].sharding.spec == P(None, "model")


def test_mean_of_signs_over_mixed_replication():
  grads = _grads(1)
  tx = optax_sign.mean_of_signs("data")
  stacked = {"w": grads["w"].reshape(N * 16, 8), "b": grads["b"].reshape(-1)}
  out = _manual(lambda g: tx.update(g, tx.init(g))[0], (GRAD_SPECS,),
                OUT_SPECS)(_place(stacked, GRAD_SPECS))
  for k in grads:
    np.testing.assert_array_equal(np.asarray(out[k]),
                                  _tsign(grads[k]).mean(0))


def test_vote_bytes_counts_each_group():
  tx = optax_sign.majority_vote("data", transport="allgather", tie="positive")
  grads = _grads(2)
  stacked = {"w": grads["w"].reshape(N * 16, 8), "b": grads["b"].reshape(-1)}
  sent = _manual(lambda g: tx.update(g, tx.init(g))[1].bytes_sent,
                 (GRAD_SPECS,), P())(_place(stacked, GRAD_SPECS))
  # Local shard: w has 16 * 4 coordinates, b has 8, in separate collectives.
  expected = (optax_sign.vote_bytes("allgather", N, 64, "positive")
              + optax_sign.vote_bytes("allgather", N, 8, "positive"))
  assert float(sent) == expected


def test_error_feedback_scales_cover_every_model_shard():
  """EF's ||p||_1 / n is taken over the whole leaf, not the local shard."""
  tx = optax_sign.scale_by_error_feedback_sign(axis_name="data")
  params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}
  state_specs = {"w": P("data", None, "model"), "b": P("data")}

  def step(g, error):
    state = optax_sign.ErrorFeedbackState(
        error=jax.tree.map(lambda e: e[0], error))
    u, state = tx.update(g, state)
    return u, jax.tree.map(lambda e: e[None], state.error)

  sharded = _manual(step, (GRAD_SPECS, state_specs), (OUT_SPECS, state_specs))
  error = _place(jax.tree.map(lambda p: np.zeros((N,) + p.shape, np.float32),
                              params), state_specs)
  reference = jax.jit(jax.vmap(tx.update, axis_name="data"))
  ref_state = optax_sign.ErrorFeedbackState(
      error=jax.tree.map(lambda p: jnp.zeros((N,) + p.shape), params))
  for seed in range(3):
    grads = _grads(10 + seed, integers=False)
    stacked = {"w": grads["w"].reshape(N * 16, 8), "b": grads["b"].reshape(-1)}
    u, error = sharded(_place(stacked, GRAD_SPECS), error)
    ref_u, ref_state = reference(grads, ref_state)
    for k in params:
      # The sums over the two model shards round in another order.
      np.testing.assert_allclose(np.asarray(u[k]), np.asarray(ref_u[k][0]),
                                 rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(np.asarray(error[k]),
                                 np.asarray(ref_state.error[k]), rtol=1e-5,
                                 atol=1e-6)


def test_alive_mask_with_mixed_replication():
  grads = _grads(3)
  alive = np.array([True, False, True, True])
  stacked = {"w": grads["w"].reshape(N * 16, 8), "b": grads["b"].reshape(-1)}

  @functools.partial(_manual, in_specs=(GRAD_SPECS, P("data")),
                     out_specs=OUT_SPECS)
  def vote(g, a):
    return optax_sign.vote_signs(g, "data", tie="positive", alive=a[0])

  out = vote(_place(stacked, GRAD_SPECS), _place(jnp.asarray(alive), P("data")))
  for k in grads:
    signs = np.where(grads[k] < 0, -1, 1) * alive.reshape(-1, *[1] * (
        grads[k].ndim - 1))
    count = signs.sum(0)
    np.testing.assert_array_equal(np.asarray(out[k]),
                                  np.where(count > 0, 1, np.where(count < 0,
                                                                  -1, 1)))


def test_alias_statistics_cover_every_model_shard():
  """ALIAS's fused reduction sums sharded leaves over "model" and counts a
  replicated leaf once, as the unsharded sums do."""
  from optax_sign import _reduce  # pylint: disable=g-import-not-at-top
  grads = _grads(4, integers=False)
  stacked = {"w": grads["w"].reshape(N * 16, 8), "b": grads["b"].reshape(-1)}

  def stats(g):
    out = _reduce.global_reduce(
        [("sum", jax.tree.map(jnp.abs, g)), ("max", jax.tree.map(jnp.abs, g))],
        worker_axes=("data",))
    return jnp.stack(out)[None]

  got = np.asarray(_manual(stats, (GRAD_SPECS,), P("data"))(
      _place(stacked, GRAD_SPECS)))
  for i in range(N):
    expected_sum = np.abs(grads["w"][i]).sum() + np.abs(grads["b"][i]).sum()
    expected_max = max(np.abs(grads["w"][i]).max(), np.abs(grads["b"][i]).max())
    np.testing.assert_allclose(np.asarray(got[i]),
                               [expected_sum, expected_max], rtol=1e-6)


def test_packed_sign_memory_keeps_rank_and_sharding():
  """Sign-memory ALIAS's packed bits keep each leaf's rank, and its sharding
  where the packed last axis divides; the state's types never change."""
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = {"tp": jax.sharding.reshard(jnp.ones((4, 32)), P(None, "x")),
              "odd": jax.sharding.reshard(jnp.ones((4, 3)), P("x", None)),
              "bias": jnp.ones(5), "scalar": jnp.ones(())}
    tx = optax_sign.alias_sign_sgd(memory="sign")
    state = tx.init(params)
    bits = state[0].memory.signs.positive
    assert {k: v.shape for k, v in bits.items()} == {
        "tp": (4, 4), "odd": (4, 1), "bias": (1,), "scalar": ()}
    assert jax.typeof(bits["tp"]).sharding.spec == P(None, "x")
    assert jax.typeof(bits["odd"]).sharding.spec == P("x", None)
    grads = jax.tree.map(lambda p: -p, params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert (jax.tree.map(jax.typeof, new_state)
            == jax.tree.map(jax.typeof, state))
    for k in params:
      assert jax.typeof(updates[k]).sharding.spec == jax.typeof(
          params[k]).sharding.spec
      np.testing.assert_array_equal(np.asarray(updates[k]) > 0, True)


def test_nnx_optimizer_with_sign_memory_and_partitioned_params():
  """nnx.Optimizer builds sign-memory ALIAS state for partitioned kernels
  whose last axis is not a multiple of 8, with the kernels' rank."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    model = nnx.Linear(
        6, 10, rngs=nnx.Rngs(0),
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          (None, "model")))
    optimizer = nnx.Optimizer(
        model, optax_sign.alias_sign_sgd(memory="sign", tie="positive"),
        wrt=nnx.Param)
    bits = optimizer.opt_state[0].memory.signs.positive
    assert bits["kernel"].shape == (6, 2)
    assert bits["bias"].shape == (2,)

    @nnx.jit
    def step(model, optimizer, x):
      grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
      optimizer.update(model, grads)

    before = np.asarray(model.kernel[...])
    step(model, optimizer, jnp.ones((3, 6)))
    assert not np.array_equal(np.asarray(model.kernel[...]), before)
