"""FSDP over the voted axis in a plain jitted step (data_parallel + worker grads).

Parameters sharded along their leading dimension over the workers' axis of a
``data=4 x model=2`` mesh are gathered for the gradient, the shard-aligned vote
updates each worker's shards, and the run equals, bitwise, the replicated run
with the replicated vote (which the other data_parallel tests compare with an
unsharded reference).
"""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_sign

from test_data_parallel import _batch, _loss, _params, N, nnx_mlp, SPECS

FSDP_SPECS = {"w1": P("data", "model"), "b1": P("model"),
              "w2": P("data", None), "b2": P()}


def _mesh(kind=AxisType.Explicit):
  return jax.make_mesh((N, 2), ("data", "model"), axis_types=(kind, kind))


def _run(tx, specs, steps, mesh=None):
  mesh = mesh or _mesh()
  params = jax.device_put(
      _params(), {k: NamedSharding(mesh, s) for k, s in specs.items()})
  batch = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
  tx = optax_sign.data_parallel(tx, "data")

  @jax.jit
  def step(params, state, x, y):
    value, grads = optax_sign.worker_value_and_grad(_loss, "data")(
        params, x, y)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  with jax.set_mesh(mesh):
    state = tx.init(params)
    for _ in range(steps):
      params, state = jax.block_until_ready(step(params, state, *batch))
  return params, state, (step, params, state, *batch)


def _chain(vote, tie, momentum):
  return optax.chain(vote("data", tie=tie),
                     *([optax.trace(0.9)] if momentum else []),
                     optax.scale_by_learning_rate(1e-2))


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("tie", ["zero", "positive"])
def test_fsdp_equals_the_replicated_vote_bitwise(tie, momentum):
  expected, _, _ = _run(_chain(optax_sign.majority_vote, tie, momentum), SPECS,
                        steps=4)
  params, state, _ = _run(
      _chain(optax_sign.sharded_majority_vote, tie, momentum), FSDP_SPECS,
      steps=4)
  mesh = _mesh()
  for k, spec in FSDP_SPECS.items():
    np.testing.assert_array_equal(np.asarray(params[k]),
                                  np.asarray(expected[k]))
    assert params[k].sharding.is_equivalent_to(NamedSharding(mesh, spec),
                                               params[k].ndim), k
  if momentum:  # the momentum is kept as shards, like its parameter
    trace = optax.tree.get(state, "trace")
    for k, spec in FSDP_SPECS.items():
      assert trace[k].shape == params[k].shape
      assert trace[k].sharding.is_equivalent_to(NamedSharding(mesh, spec),
                                                trace[k].ndim), k


def test_only_packed_signs_and_the_parameter_gather_cross_the_worker_axis():
  tie = "positive"
  *_, (step, *args) = _run(
      _chain(optax_sign.sharded_majority_vote, tie, False), FSDP_SPECS,
      steps=1)
  report = optax_sign.communication_bytes(step, *args)
  over_data = [c for c in report.collectives if "data" in c.axes]
  floats = {(c.op, c.dtype) for c in over_data if c.dtype not in ("u8", "s8")}
  assert floats == {("all-gather", "f32")}, report  # the FSDP gather only
  # The vote's bytes: per model shard, each FSDP group of one layout sends
  # (N-1) packed rows of its block (w1: 16x16 local coordinates, w2: 32x4),
  # the whole leaves (b1's local 16, b2's 4) take the replicated vote.
  signs = sum(c.bytes_sent for c in over_data if c.dtype in ("u8", "s8"))
  rows = [16 * 16 // N, 32 * 4 // N]
  expected = sum((N - 1) * -(-r // 8) for r in rows) + sum(
      optax_sign.vote_bytes(optax_sign._communication.choose_transport(
          "auto", N, d, tie), N, d, tie) for d in (16, 4))
  assert signs == pytest.approx(expected), report
  # Against the replicated vote of the same model on the same mesh.
  *_, (rstep, *rargs) = _run(_chain(optax_sign.majority_vote, tie, False),
                             SPECS, steps=1)
  replicated = optax_sign.communication_bytes(rstep, *rargs)
  assert signs < replicated.bytes_by_axes()[("data",)]


def test_the_replicated_vote_on_fsdp_parameters_raises_clearly():
  with pytest.raises(ValueError, match="sharded_majority_vote"):
    _run(_chain(optax_sign.majority_vote, "zero", False), FSDP_SPECS, steps=1)


def test_worker_axis_on_another_dimension_raises_clearly():
  specs = dict(FSDP_SPECS, w2=P(None, "data"))
  with pytest.raises(ValueError, match=r"\['w2'\].*leading dimension only"):
    _run(_chain(optax_sign.sharded_majority_vote, "zero", False), specs,
         steps=1)


def test_fsdp_on_an_auto_worker_axis_raises_clearly():
  with pytest.raises(ValueError, match="not Explicit"):
    _run(_chain(optax_sign.sharded_majority_vote, "zero", False), FSDP_SPECS,
         steps=1, mesh=_mesh(AxisType.Auto))


def test_flax_nnx_optimizer_with_fsdp_partitioning():
  """nnx.with_partitioning over ("data", "model") and nnx.Optimizer: the
  same bits as the replicated vote on the same model laid out for TP."""
  nnx = pytest.importorskip("flax.nnx")

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  def train(fsdp):
    vote = (optax_sign.sharded_majority_vote if fsdp
            else optax_sign.majority_vote)
    with jax.set_mesh(_mesh()):
      data = "data" if fsdp else None
      model = nnx_mlp(nnx, (data, "model"), (data, None))
      optimizer = nnx.Optimizer(
          model, optax_sign.data_parallel(_chain(vote, "zero", True), "data"),
          wrt=nnx.Param)

      @nnx.jit
      def train_step(model, optimizer, x, y):
        grads = optax_sign.worker_grad(loss_fn, "data")(model, x, y)
        optimizer.update(model, grads)

      x, y = jax.device_put(_batch(), NamedSharding(_mesh(), P("data")))
      for _ in range(3):
        train_step(model, optimizer, x, y)
      return model

  fsdp, replicated = train(True), train(False)
  assert fsdp.hidden.kernel[...].sharding.spec == P("data", "model")
  assert fsdp.out.kernel[...].sharding.spec == P("data", None)
  for a, b in zip(jax.tree.leaves(nnx.state(fsdp, nnx.Param)),
                  jax.tree.leaves(nnx.state(replicated, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
