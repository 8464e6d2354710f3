"""Compressed data parallelism in a plain jitted step (worker grads + data_parallel).

Every sharded run (mesh data=4 x model=2, tensor-parallel tree with replicated
biases, Explicit and Auto axes) is compared after several steps with an
unsharded reference: a named ``vmap`` over the four workers' batches.
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
from optax_sign import _communication

N = 4
SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None),
         "b2": P()}


def _params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w1": jax.random.normal(k[0], (16, 32)) * 0.3, "b1": jnp.zeros(32),
          "w2": jax.random.normal(k[1], (32, 4)) * 0.3, "b2": jnp.zeros(4)}


def _batch():
  k = jax.random.split(jax.random.key(1), 2)
  return jax.random.normal(k[0], (64, 16)), jax.random.normal(k[1], (64, 4))


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  # A replicated output, which an Explicit "model" axis needs said.
  under_mesh = not jax.sharding.get_abstract_mesh().empty
  out = jnp.matmul(h, params["w2"], out_sharding=P() if under_mesh else None)
  return jnp.mean((out + params["b2"] - y) ** 2)


def _mesh(kind):
  return jax.make_mesh((N, 2), ("data", "model"), axis_types=(kind, kind))


def _reference(make_tx, steps):
  """Named vmap over the workers' batches: the unsharded reference."""
  tx = make_tx("i")
  params, (x, y) = _params(), _batch()
  xs, ys = x.reshape(N, -1, 16), y.reshape(N, -1, 4)

  @jax.jit
  def step(params, states):  # every worker keeps its own state
    def worker(state, xb, yb):
      value, grads = jax.value_and_grad(_loss)(params, xb, yb)
      return tx.update(grads, state, params, value=value)

    updates, states = jax.vmap(worker, axis_name="i")(states, xs, ys)
    return (optax.apply_updates(params, jax.tree.map(lambda u: u[0], updates)),
            states)

  states = jax.tree.map(lambda s: jnp.stack([s] * N), tx.init(params))
  for _ in range(steps):
    params, states = step(params, states)
  return params


def _sharded(make_tx, steps, kind):
  mesh = _mesh(kind)
  tx = optax_sign.data_parallel(make_tx("data"), "data", mesh=mesh)
  params = jax.device_put(
      _params(), {k: NamedSharding(mesh, s) for k, s in SPECS.items()})
  batch = jax.device_put(_batch(), NamedSharding(mesh, P("data")))

  @jax.jit
  def step(params, state, x, y):
    value, grads = optax_sign.worker_value_and_grad(
        _loss, "data", mesh=mesh)(params, x, y)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = jax.block_until_ready(step(params, state, *batch))
  return params, state, (step, params, state, *batch)


def _mean_of_signs(axis):
  return optax.chain(optax_sign.mean_of_signs(axis),
                     optax.scale_by_learning_rate(1e-2))


def _vote(transport):
  return lambda axis: optax.chain(
      optax_sign.majority_vote(axis, transport=transport),
      optax.scale_by_learning_rate(1e-2))


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("transport", ["psum", "allgather", "alltoall"])
def test_vote_in_jit_equals_unsharded_reference_bitwise(kind, transport):
  expected = _reference(_vote(transport), steps=4)
  params, state, _ = _sharded(_vote(transport), steps=4, kind=kind)
  for k in expected:
    np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(expected[k]))
    if kind == AxisType.Explicit:
      assert params[k].sharding.is_equivalent_to(
          NamedSharding(_mesh(kind), SPECS[k]), params[k].ndim)
  count = optax.tree.get(state, "count")  # shared by the workers: stored once
  assert count.shape == () and int(count) == 4


def test_only_packed_signs_cross_the_worker_axis():
  *_, (step, *args) = _sharded(_vote("auto"), steps=1, kind=AxisType.Explicit)
  report = optax_sign.communication_bytes(step, *args)
  over_data = [c for c in report.collectives if "data" in c.axes]
  assert over_data, report
  assert {c.dtype for c in over_data} <= {"u8", "s8"}, over_data
  # Each worker votes on its local model shard, one collective per group of
  # leaves: those sharded over "model" (w1, b1, w2) and the replicated b2.
  params = _params()
  local = [sum(params[k].size // 2 for k in ("w1", "b1", "w2")),
           params["b2"].size]
  expected = sum(optax_sign.vote_bytes(
      _communication.choose_transport("auto", N, d, "zero"), N, d, "zero")
                 for d in local)
  assert report.bytes_by_axes()[("data",)] == pytest.approx(expected)
  # Over "model" only the tensor-parallel layer's own f32 all-reduce: no
  # leaf is gathered or resharded for the exchange.
  assert {(c.op, c.dtype) for c in report.collectives
          if c.axes == ("model",)} == {("all-reduce", "f32")}, report


def _replay(make, steps, sharded):
  """Updates of ``make`` on a fixed sequence of per-worker gradients [N, ...],
  by data_parallel on the TP mesh or by a named vmap (the reference).

  Fixed gradients isolate the optimizer: ALIAS's smoothness sample divides a
  gradient difference by a 1e-6 first step, so recomputed gradients (whose
  float rounding differs between layouts) would change it by ~1e-3.
  """
  params = _params()
  keys = jax.random.split(jax.random.key(2), steps)
  grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, (N,) + p.shape),
                        params) for k in keys]
  values = [jnp.arange(N, dtype=jnp.float32) + 10.0 - t for t in range(steps)]
  if sharded:
    mesh = _mesh(AxisType.Explicit)
    tx = optax_sign.data_parallel(make("data"), "data", mesh=mesh)
    place = lambda tree, specs: jax.device_put(
        tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    params = place(params, SPECS)
    grads = [place(g, {k: P("data", *s) for k, s in SPECS.items()})
             for g in grads]
    values = [place(v, P("data")) for v in values]
    update = jax.jit(tx.update)
    state = tx.init(params)
  else:
    tx = make("i")
    update = jax.jit(jax.vmap(tx.update, in_axes=(0, 0, None), axis_name="i"))
    state = jax.tree.map(lambda s: jnp.stack([s] * N), tx.init(params))
  out = []
  for g, v in zip(grads, values):
    updates, state = update(g, state, params, value=v)
    updates = updates if sharded else jax.tree.map(lambda u: u[0], updates)
    params = optax.apply_updates(params, updates)
    out.append(jax.device_get(updates))
  return out


@pytest.mark.parametrize("make", [_vote("auto"), _vote("psum"), _mean_of_signs],
                         ids=["vote auto", "vote psum", "mean of signs"])
def test_auto_mesh_exchange_keeps_each_leaf_layout(make):
  """On Auto axes the leaves' layouts are unknown inside jit: "auto" takes
  the elementwise int8 all-reduce leaf by leaf, so nothing is resharded over
  "model" (flattened, the leaves moved 1.7-3.6 B/param over it)."""
  *_, (step, *args) = _sharded(make, steps=1, kind=AxisType.Auto)
  with jax.set_mesh(_mesh(AxisType.Auto)):
    report = optax_sign.communication_bytes(step, *args)
  assert {(c.op, c.dtype) for c in report.collectives
          if c.axes == ("model",)} == {("all-reduce", "f32")}, report
  over_data = [c for c in report.collectives if "data" in c.axes]
  assert {(c.op, c.dtype) for c in over_data} <= {("all-reduce", "s8"),
                                                 ("all-reduce", "f32")}
  floats = [c for c in over_data if c.dtype == "f32"]
  assert all(c.elements == 1 for c in floats), floats  # only the scalar loss


def test_auto_mesh_error_feedback_in_layout_equals_explicit():
  """On Auto axes error feedback packs each leaf's bits along its last axis
  in the leaf's layout: the same run as on Explicit axes, and no float
  leaf crosses "model" (flattened, 12.2 B/param did in the benchmark)."""
  make = lambda axis: optax.chain(
      optax_sign.scale_by_error_feedback_sign(axis_name=axis),
      optax.scale_by_learning_rate(1e-2))
  explicit, _, _ = _sharded(make, steps=3, kind=AxisType.Explicit)
  auto, _, (step, *args) = _sharded(make, steps=3, kind=AxisType.Auto)
  for k in explicit:
    np.testing.assert_allclose(np.asarray(auto[k]), np.asarray(explicit[k]),
                               rtol=2e-6, atol=1e-8)
  with jax.set_mesh(_mesh(AxisType.Auto)):
    report = optax_sign.communication_bytes(step, *args)
  size = sum(p.size for p in jax.tree.leaves(_params()))
  floats = [c for c in report.collectives if c.axes == ("model",)
            and c.dtype == "f32" and c.elements > 1]
  # The tensor-parallel layer's own all-reduce of activations only.
  assert {c.op for c in floats} <= {"all-reduce"}, report
  assert report.bytes_by_axes().get(("model",), 0) < 1.0 * size, report


@pytest.mark.parametrize("make", [
    lambda axis: optax.chain(
        optax_sign.scale_by_error_feedback_sign(axis_name=axis),
        optax.scale_by_learning_rate(1e-2)),
    lambda axis: optax.chain(optax_sign.mean_of_signs(axis),
                             optax.scale_by_learning_rate(1e-2)),
    lambda axis: optax_sign.alias_sign_sgd(axis_name=axis),
    lambda axis: optax_sign.alias_sign_sgd("lower_bound", memory="sign",
                                           axis_name=axis),
    lambda axis: optax.chain(  # Signum with a vote: per-worker momentum
        optax_sign.scale_by_lion_momentum(b1=0.9, b2=0.9),
        optax_sign.majority_vote(axis), optax.scale_by_learning_rate(1e-2)),
    lambda axis: optax.chain(  # an injected learning rate after the vote
        optax_sign.majority_vote(axis),
        optax.inject_hyperparams(optax.sgd)(learning_rate=1e-2)),
], ids=["error_feedback", "mean_of_signs", "alias", "alias_lower_bound",
        "signum_vote", "inject_hyperparams_sgd"])
def test_other_aggregators_match_reference(make):
  expected = _replay(make, steps=5, sharded=False)
  actual = _replay(make, steps=5, sharded=True)
  for e, a in zip(expected, actual):
    for k in e:
      # Sums over the two model shards round in another order; means of
      # nearly cancelling scaled signs (~4e-3 each) then differ by ~3e-9.
      np.testing.assert_allclose(a[k], e[k], rtol=2e-6, atol=1e-8)


def test_state_leaves_are_per_worker_only_where_they_differ():
  mesh = _mesh(AxisType.Explicit)
  params = jax.device_put(
      _params(), {k: NamedSharding(mesh, s) for k, s in SPECS.items()})
  tx = optax_sign.data_parallel(optax.chain(
      optax_sign.scale_by_lion_momentum(b1=0.9, b2=0.9),
      optax_sign.majority_vote("data"), optax.scale_by_learning_rate(1e-2)),
                                "data")
  momentum, vote, _ = tx.init(params)
  assert momentum.mu["w1"].shape == (N, 16, 32)  # a momentum of local grads
  assert momentum.mu["w1"].sharding.spec == P("data", None, "model")
  assert vote.count.shape == ()  # shared


def test_error_feedback_residual_is_per_worker():
  make = lambda axis: optax_sign.scale_by_error_feedback_sign(axis_name=axis)
  _, state, _ = _sharded(make, steps=2, kind=AxisType.Explicit)
  error = np.asarray(state.error["w1"])
  assert error.shape == (N, 16, 32)
  assert not np.array_equal(error[0], error[1])
  assert state.error["w1"].sharding.spec == P("data", None, "model")


def test_without_an_aggregator_raises_clearly():
  with pytest.raises(ValueError, match="still differs between the workers"):
    _sharded(lambda axis: optax.sgd(1e-2), steps=1, kind=AxisType.Explicit)


def test_fsdp_params_need_the_sharded_vote_and_give_full_size_grads():
  """Parameters sharded over the worker axis (FSDP): the replicated vote is
  refused by name; each worker's gradient is the full-size one, bitwise the
  gradient with replicated parameters (see test_data_parallel_fsdp.py)."""
  mesh = _mesh(AxisType.Explicit)
  params = jax.device_put(_params(), NamedSharding(mesh, P("data")))
  tx = optax_sign.data_parallel(optax_sign.majority_vote("data"), "data")
  with pytest.raises(ValueError, match="sharded_majority_vote"):
    tx.init(params)
  batch = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
  grads = jax.jit(optax_sign.worker_grad(_loss, "data"))(params, *batch)
  expected = jax.jit(optax_sign.worker_grad(_loss, "data"))(
      jax.device_put(_params(), NamedSharding(mesh, P())), *batch)
  for k in grads:
    assert grads[k].shape == (N,) + params[k].shape
    np.testing.assert_array_equal(np.asarray(grads[k]),
                                  np.asarray(expected[k]))


def test_missing_mesh_and_bad_axis_raise():
  tx = optax_sign.data_parallel(optax_sign.majority_vote("data"), "data")
  with pytest.raises(ValueError, match="no mesh found"):
    tx.init({"w": jnp.ones(3)})
  mesh = _mesh(AxisType.Explicit)
  tx = optax_sign.data_parallel(optax_sign.majority_vote("rows"), "rows",
                                mesh=mesh)
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    tx.init({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="one mesh axis"):
    optax_sign.data_parallel(optax_sign.majority_vote("data"), ("data",))


def test_worker_grads_are_the_per_worker_gradients():
  mesh = _mesh(AxisType.Explicit)
  params = jax.device_put(
      _params(), {k: NamedSharding(mesh, s) for k, s in SPECS.items()})
  x, y = _batch()
  with jax.set_mesh(mesh):  # the context mesh, no mesh= argument
    value, grads = jax.jit(optax_sign.worker_value_and_grad(_loss, "data"))(
        params, *jax.device_put((x, y), NamedSharding(mesh, P("data"))))
  expected_v, expected_g = jax.vmap(jax.value_and_grad(_loss),
                                    in_axes=(None, 0, 0))(
      _params(), x.reshape(N, -1, 16), y.reshape(N, -1, 4))
  np.testing.assert_allclose(value, expected_v, rtol=1e-6)
  for k in expected_g:
    assert grads[k].shape == (N,) + _params()[k].shape
    np.testing.assert_allclose(grads[k], expected_g[k], rtol=1e-5, atol=1e-7)


def nnx_mlp(nnx, hidden_kernel, out_kernel):
  """A 16-32-4 NNX MLP with ``nnx.with_partitioning`` kernels laid out over
  the given mesh axes (the hidden bias over "model"), under the context mesh."""

  class Model(nnx.Module):

    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.hidden = nnx.Linear(
          16, 32, rngs=rngs,
          kernel_init=nnx.with_partitioning(init, hidden_kernel),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("model",)))
      self.out = nnx.Linear(
          32, 4, rngs=rngs,
          kernel_init=nnx.with_partitioning(init, out_kernel))

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)), out_sharding=P())

  return Model(nnx.Rngs(0))


def test_flax_nnx_optimizer_with_partitioned_model():
  nnx = pytest.importorskip("flax.nnx")
  mesh = _mesh(AxisType.Explicit)

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  def make(axis):
    return optax.chain(optax_sign.majority_vote(axis),
                       optax.scale_by_learning_rate(1e-2))

  with jax.set_mesh(mesh):
    model = nnx_mlp(nnx, (None, "model"), ("model", None))
    reference = nnx.clone(model)
    optimizer = nnx.Optimizer(model, optax_sign.data_parallel(make("data"),
                                                              "data"),
                              wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      grads = optax_sign.worker_grad(loss_fn, "data")(model, x, y)
      optimizer.update(model, grads)

    x, y = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
    for _ in range(3):
      train_step(model, optimizer, x, y)
    kernel = model.hidden.kernel[...]
    assert kernel.sharding.spec == P(None, "model")

  # Reference: the same model's parameters as a plain tree, named vmap.
  graphdef, params = nnx.split(reference, nnx.Param)
  params = jax.device_get(nnx.to_pure_dict(params))
  tx = make("i")
  state = tx.init(params)
  xs, ys = _batch()
  for _ in range(3):
    def worker(xb, yb, params=params, state=state):
      def f(p):
        m = nnx.merge(graphdef, nnx.State(p))
        return jnp.mean((m.out(jnp.tanh(m.hidden(xb))) - yb) ** 2)
      return tx.update(jax.grad(f)(params), state, params)
    updates, states = jax.vmap(worker, axis_name="i")(
        xs.reshape(N, -1, 16), ys.reshape(N, -1, 4))
    params = optax.apply_updates(params,
                                 jax.tree.map(lambda u: u[0], updates))
    state = jax.tree.map(lambda s: s[0], states)
  np.testing.assert_array_equal(np.asarray(kernel),
                                np.asarray(params["hidden"]["kernel"]))


def test_worker_grads_keep_tensor_parallel_params_sharded():
  """No all-gather of parameters or gradients over "model" (JAX lowers the
  worker-manual region with Explicit axes replicated unless made Auto)."""
  mesh = _mesh(AxisType.Explicit)
  params = jax.device_put(
      _params(), {k: NamedSharding(mesh, s) for k, s in SPECS.items()})
  batch = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
  grads_fn = optax_sign.worker_grad(_loss, "data")
  report = optax_sign.communication_bytes(grads_fn, params, *batch)
  assert report.collectives, "the row-parallel layer needs an all-reduce"
  assert {(c.op, c.axes) for c in report.collectives} == {
      ("all-reduce", ("model",))}, report
  grads = jax.jit(grads_fn)(params, *batch)
  for k, spec in SPECS.items():
    assert grads[k].sharding.is_equivalent_to(
        NamedSharding(mesh, P("data", *spec)), grads[k].ndim)


def test_has_aux_and_tuple_argnums():
  mesh = _mesh(AxisType.Explicit)
  params = jax.device_put(
      _params(), {k: NamedSharding(mesh, s) for k, s in SPECS.items()})
  x, y = jax.device_put(_batch(), NamedSharding(mesh, P("data")))

  def loss_aux(p, x, y):
    value = _loss(p, x, y)
    return value, {"twice": 2 * value}

  (value, aux), grads = jax.jit(optax_sign.worker_value_and_grad(
      loss_aux, "data", has_aux=True))(params, x, y)
  np.testing.assert_allclose(aux["twice"], 2 * value, rtol=1e-6)
  assert value.shape == (N,)
  (both,), aux2 = jax.jit(optax_sign.worker_grad(
      loss_aux, "data", has_aux=True, argnums=(0,)))(params, x, y)
  for k in grads:
    np.testing.assert_array_equal(both[k], grads[k])
  np.testing.assert_array_equal(aux2["twice"], aux["twice"])


def test_nnx_module_state_comes_back_shared():
  """Batch statistics are averaged over the workers, RNG counters advance."""
  nnx = pytest.importorskip("flax.nnx")
  mesh = _mesh(AxisType.Explicit)

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.lin = nnx.Linear(16, 8, rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.out = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
      return self.out(self.drop(self.bn(jax.nn.relu(self.lin(x)))))

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  with jax.set_mesh(mesh):
    model = Model(nnx.Rngs(0))
    kernel, bias = model.lin.kernel[...], model.lin.bias[...]
    tx = optax.chain(optax_sign.majority_vote("data"),
                     optax.scale_by_learning_rate(1e-2))
    optimizer = nnx.Optimizer(model, optax_sign.data_parallel(tx, "data"),
                              wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = optax_sign.worker_value_and_grad(loss_fn, "data")(
          model, x, y)
      optimizer.update(model, grads)
      return loss

    x, y = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
    loss = train_step(model, optimizer, x, y)
    assert loss.shape == (N,)
    batch_mean = jnp.mean(jax.nn.relu(_batch()[0] @ kernel + bias), axis=0)
    np.testing.assert_allclose(np.asarray(model.bn.mean[...]),
                               np.asarray((1 - 0.99) * batch_mean),
                               rtol=1e-5, atol=1e-7)
    train_step(model, optimizer, x, y)
    assert int(model.drop.rngs.count[...]) == 2


def test_optax_global_statistics_see_whole_leaves():
  """An optax step after the exchange (clip_by_global_norm) computes its
  statistic over the whole model, not per model shard."""
  make = lambda axis: optax.chain(
      optax_sign.scale_by_error_feedback_sign(axis_name=axis),
      optax.clip_by_global_norm(0.05))
  for updates in _replay(make, steps=2, sharded=True):
    norm = np.sqrt(sum(np.sum(np.square(u)) for u in updates.values()))
    np.testing.assert_allclose(norm, 0.05, rtol=1e-5)


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto])
def test_init_eager_and_jitted_and_an_unplaced_alive_mask(kind):
  """Per-worker state is placed eagerly under the mesh context and inside
  jit; an alive mask made with NumPy is resharded over the workers."""
  mesh = _mesh(kind)
  tx = optax_sign.data_parallel(optax.chain(
      optax_sign.scale_by_error_feedback_sign(axis_name="data"),
      optax_sign.majority_vote("data"), optax.scale_by_learning_rate(1e-2)),
                                "data", mesh=mesh)
  params = jax.device_put(
      _params(), {k: NamedSharding(mesh, s) for k, s in SPECS.items()})
  with jax.set_mesh(mesh):
    eager = tx.init(params)
    jitted = jax.jit(tx.init)(params)
  assert eager[0].error["w1"].shape == jitted[0].error["w1"].shape == (
      N, 16, 32)
  grads = jax.device_put(
      jax.tree.map(lambda p: jnp.ones((N,) + p.shape), _params()),
      {k: NamedSharding(mesh, P("data", *s)) for k, s in SPECS.items()})
  alive = np.array([True, False, True, True])
  updates, _ = jax.jit(tx.update)(grads, eager, params, alive=alive)
  np.testing.assert_array_equal(np.asarray(updates["b2"]),
                                np.full(4, -1e-2, np.float32))


def test_shared_value_for_reduce_on_plateau():
  """per_worker_args=() traces no per-worker value=: a transformation that
  needs one shared loss (reduce_on_plateau) gets the mean loss."""
  mesh = _mesh(AxisType.Explicit)
  inner = optax.chain(optax_sign.majority_vote("data"),
                      optax.scale_by_learning_rate(1e-2),
                      optax.contrib.reduce_on_plateau(patience=1))
  params = jax.device_put(
      _params(), {k: NamedSharding(mesh, s) for k, s in SPECS.items()})
  batch = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
  with pytest.raises(Exception):  # the default traces value= per worker
    optax_sign.data_parallel(inner, "data", mesh=mesh).init(params)
  tx = optax_sign.data_parallel(inner, "data", mesh=mesh, per_worker_args=())

  @jax.jit
  def step(params, state, x, y):
    value, grads = optax_sign.worker_value_and_grad(
        _loss, "data", mesh=mesh)(params, x, y)
    updates, state = tx.update(grads, state, params, value=value.mean())
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state, *batch)
  best = float(state[2].best_value)  # the shared mean loss reached it
  assert np.isfinite(best) and best < float(_loss(_params(), *_batch()))
  with pytest.raises(ValueError, match="per_worker_args entries"):
    optax_sign.data_parallel(inner, "data", per_worker_args=("loss",))


def test_nnx_workers_draw_independent_random_numbers():
  nnx = pytest.importorskip("flax.nnx")
  mesh = _mesh(AxisType.Explicit)

  class Noisy(nnx.Module):

    def __init__(self):
      self.lin = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
      self.rngs = nnx.Rngs(noise=1)

    def __call__(self, x):
      return self.lin(x) + jax.random.normal(self.rngs.noise(), (4,))

  with jax.set_mesh(mesh):
    model = Noisy()
    x = jax.device_put(jnp.ones((64, 16)), NamedSharding(mesh, P("data")))
    value, _ = nnx.jit(optax_sign.worker_value_and_grad(
        lambda m, x: jnp.mean(m(x)), "data"))(model, x)
    assert len(set(np.asarray(value).tolist())) == N  # same data, own noise
    assert int(model.rngs.noise.count[...]) == 1


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto])
def test_nnx_alias_on_a_one_axis_mesh(kind):
  """The common case: a data-only mesh set with jax.set_mesh, ALIAS with its
  defaults and the workers' axis, nnx.Optimizer, value= per worker."""
  nnx = pytest.importorskip("flax.nnx")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  with jax.set_mesh(mesh):
    model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), jax.nn.relu,
                           nnx.Linear(32, 1, rngs=nnx.Rngs(1)))
    optimizer = nnx.Optimizer(model, optax_sign.data_parallel(
        optax_sign.alias_sign_sgd(axis_name="data"), "data"), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = optax_sign.worker_value_and_grad(
          lambda m, x, y: jnp.mean((m(x) - y) ** 2), "data")(model, x, y)
      optimizer.update(model, grads, value=loss)
      return loss.mean()

    x = jax.random.normal(jax.random.key(0), (256, 16))
    x, y = jax.device_put((x, jnp.sum(x, 1, keepdims=True)),
                          NamedSharding(mesh, P("data")))
    first = float(train_step(model, optimizer, x, y))
    for _ in range(100):
      last = float(train_step(model, optimizer, x, y))
  assert last < 0.05 * first, (first, last)
  assert np.asarray(optax.tree.get(optimizer.opt_state, "stepsize")).shape == ()


@pytest.mark.parametrize("jit", [False, True])
def test_replicated_batch_is_split_over_an_explicit_worker_axis(jit):
  """A batch not yet laid out over the worker axis (a host array, or
  replicated) is split where it lies instead of a raw shard_map error."""
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4],
                       axis_types=(AxisType.Explicit,))

  def loss(p, b):
    return jnp.mean((b @ p["w"]) ** 2)

  rows = np.arange(24.0, dtype=np.float32).reshape(8, 3)
  with jax.set_mesh(mesh):
    params = {"w": jnp.ones(3)}
    fn = optax_sign.worker_value_and_grad(loss, "data")
    fn = jax.jit(fn) if jit else fn
    placed = jax.device_put(rows, NamedSharding(mesh, P("data")))
    want, want_grads = fn(params, placed)
    for batch in (rows, jnp.asarray(rows)):
      got, grads = fn(params, batch)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      np.testing.assert_array_equal(np.asarray(grads["w"]),
                                    np.asarray(want_grads["w"]))
  np.testing.assert_allclose(
      np.asarray(want), [np.mean(rows[2 * i:2 * i + 2].sum(1) ** 2)
                         for i in range(4)], rtol=1e-6)
