"""FSDP over the voted axis: the shard-aligned majority vote.

Four workers under ``shard_map`` hold row blocks of two matrices (and a whole
bias), all-gather them for the forward pass and vote with
``sharded_majority_vote``; the parameters stay sharded. The reference is the
replicated vote (``majority_vote``) on whole parameters in the same
``shard_map``: the parameters must agree bit for bit after every step.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_sign

N = 4
LR = 0.05
SHARDED = ("w1", "w2")  # sharded along the leading axis; "b" is whole


def _mesh():
  return jax.make_mesh((N,), ("data",), devices=jax.devices()[:N])


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": 0.5 * jax.random.normal(k1, (8, 6)),
          "w2": 0.5 * jax.random.normal(k2, (4, 8)),
          "b": jnp.zeros(8)}


def _batch():
  kx, ky = jax.random.split(jax.random.key(1))
  return (jax.random.normal(kx, (N * 16, 6)),
          jax.random.normal(ky, (N * 16, 4)))


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"].T + params["b"])
  return jnp.mean((h @ params["w2"].T - y) ** 2)


_SPECS = {"w1": P("data"), "w2": P("data"), "b": P()}


def _fsdp_step(tx, mesh):
  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(_SPECS, P(), P("data"), P("data"), P()),
                     out_specs=(_SPECS, P()))
  def step(shards, state, x, y, alive):
    full = {k: lax.all_gather(v, "data", axis=0, tiled=True)
               if k in SHARDED else v for k, v in shards.items()}
    grads = jax.grad(_loss)(optax_sign.per_worker(full, "data"), x, y)
    updates, state = tx.update(grads, state, shards, alive=alive)
    return optax.apply_updates(shards, updates), state
  return step


def _replicated_step(tx, mesh):
  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), P(), P("data"), P("data"), P()),
                     out_specs=(P(), P()))
  def step(params, state, x, y, alive):
    grads = jax.grad(_loss)(optax_sign.per_worker(params, "data"), x, y)
    updates, state = tx.update(grads, state, params, alive=alive)
    return optax.apply_updates(params, updates), state
  return step


def _run(step, tx, params, mesh, steps, alive):
  x, y = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
  state = tx.init(params)
  for _ in range(steps):
    params, state = jax.block_until_ready(step(params, state, x, y, alive))
  return params, state


@pytest.mark.parametrize("tie", ["zero", "positive", "negative"])
@pytest.mark.parametrize("dead", [(), (2,), (0, 1, 2, 3)])
def test_fsdp_vote_equals_the_replicated_vote_bitwise(tie, dead):
  mesh = _mesh()
  alive = jnp.array([i not in dead for i in range(N)])
  sharded_tx = optax.chain(optax_sign.sharded_majority_vote("data", tie=tie),
                           optax.scale_by_learning_rate(LR))
  replicated_tx = optax.chain(optax_sign.majority_vote("data", tie=tie),
                              optax.scale_by_learning_rate(LR))
  shards = jax.device_put(_params(), {k: NamedSharding(mesh, s)
                                      for k, s in _SPECS.items()})
  got, state = _run(_fsdp_step(sharded_tx, mesh), sharded_tx, shards, mesh,
                    6, alive)
  want, _ = _run(_replicated_step(replicated_tx, mesh), replicated_tx,
                 _params(), mesh, 6, alive)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]),
                                  err_msg=k)
    assert ("data" in tuple(got[k].sharding.spec)) == (k in SHARDED)
  moved = any(not np.array_equal(got[k], _params()[k]) for k in got)
  assert moved == (len(dead) < N)  # no live worker: no step
  assert int(state[0].count) == 6


@pytest.mark.parametrize("tie, planes", [("positive", 1), ("zero", 2)])
def test_fsdp_vote_sends_one_all_to_all_of_bits(tie, planes):
  """From the compiled step: over "data" the gradients travel as one u8
  all-to-all (the whole bias as the replicated vote); no float collective
  but the parameters' all-gather; bytes equal the formula."""
  mesh = _mesh()
  tx = optax.chain(optax_sign.sharded_majority_vote("data", tie=tie),
                   optax.scale_by_learning_rate(LR))
  shards = jax.device_put(_params(), {k: NamedSharding(mesh, s)
                                      for k, s in _SPECS.items()})
  x, y = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
  report = optax_sign.communication_bytes(
      _fsdp_step(tx, mesh), shards, tx.init(shards), x, y, jnp.ones(N, bool))
  ops = [(c.op, c.dtype) for c in report.collectives]
  assert ("all-to-all", "u8") in ops
  floats = [c for c in report.collectives if c.dtype == "f32"]
  assert {c.op for c in floats} == {"all-gather"}  # the FSDP parameter gather
  assert sum(c.elements for c in floats) == (8 * 6 + 4 * 8) // N  # shards
  own = (8 * 6 + 4 * 8) // N  # coordinates each worker votes on
  alltoall = [c for c in report.collectives if c.op == "all-to-all"]
  assert sum(c.bytes_sent for c in alltoall) == (N - 1) * planes * -(-own // 8)
  # The state's counter prices the same step.
  grads = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                       _params())
  local = {k: jax.ShapeDtypeStruct(
      (v.shape[0] // N,) + v.shape[1:] if k in SHARDED else v.shape, v.dtype)
           for k, v in _params().items()}
  formula = optax_sign.sharded_vote_bytes(grads, local, N, tie)
  assert formula == pytest.approx(report.total_bytes - sum(
      c.bytes_sent for c in floats))


def test_fsdp_bytes_per_parameter_meet_the_goal():
  """(N-1)/N * c/8 bytes per parameter at N = 8: 0.109 (two-valued tie),
  half of the replicated all-to-all vote's 0.219."""
  d = 8 * 4096
  grads = {"w": jax.ShapeDtypeStruct((d, 64), jnp.float32)}
  shard = {"w": jax.ShapeDtypeStruct((d // 8, 64), jnp.float32)}
  per_param = optax_sign.sharded_vote_bytes(grads, shard, 8, "positive") / (
      d * 64)
  assert per_param == pytest.approx(7 / 64)
  assert per_param <= 0.125
  assert per_param == pytest.approx(optax_sign.vote_bytes(
      "alltoall", 8, d * 64, tie="positive") / (d * 64) / 2)


def test_fsdp_vote_refuses_what_it_cannot_vote():
  tx = optax_sign.sharded_majority_vote("data")
  with pytest.raises(ValueError, match="axis_name"):
    optax_sign.sharded_majority_vote(None)
  with pytest.raises(ValueError, match="tie"):
    optax_sign.sharded_majority_vote("data", tie="up")
  grads = {"w": jnp.ones((8, 3))}

  def call(params, **kw):
    return jax.vmap(lambda g: tx.update(g, tx.init(g), params, **kw)[0],
                    axis_name="data")(jax.tree.map(lambda a: a[None] * jnp.ones(
                        (N,) + a.shape), grads))

  with pytest.raises(ValueError, match="params"):
    call(None)
  with pytest.raises(ValueError, match=r"shape \(8, 3\).*\(3, 3\)"):
    call({"w": jnp.ones((3, 3))})
  with pytest.raises(ValueError, match="leaves"):
    call({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})


@pytest.mark.parametrize("tie", ["zero", "positive"])
def test_named_vmap_blocks_are_the_replicated_vote(tie):
  """Under a named ``vmap`` worker j's output is block j of the vote of
  every worker's full gradient (with zeros and odd sizes: 5 x 3 blocks)."""
  g = jax.random.normal(jax.random.key(3), (N, 4 * 5, 3))
  g = g.at[:, ::4].set(0.0)  # local zeros: abstain with tie="zero"
  shard = jnp.zeros((5, 3))
  blocks = jax.vmap(lambda x: optax_sign.vote_signs_sharded(
      {"w": x}, {"w": shard}, "i", tie=tie)["w"], axis_name="i")(g)
  full = jax.vmap(lambda x: optax_sign.vote_signs(x, "i", tie=tie),
                  axis_name="i")(g)[0]
  np.testing.assert_array_equal(np.asarray(blocks).reshape(full.shape),
                                np.asarray(full))
