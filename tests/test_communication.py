"""Specification tests for multi-worker sign aggregation (majority vote)."""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_sign
from optax_sign import _communication

TRANSPORTS = ("psum", "allgather", "alltoall", "auto")
_TIE_VALUE = {"zero": 0, "positive": 1, "negative": -1}


def _tsign(x, tie):
  return np.where(x > 0, 1, np.where(x < 0, -1, _TIE_VALUE[tie]))


def _reference_vote(v, tie, alive):
  """NumPy tsign_T(sum_i a_i tsign_T(v_i)) for v of shape [N, d]."""
  count = (_tsign(v, tie) * alive[:, None].astype(int)).sum(0)
  return _tsign(count, tie)


def _mesh(n):
  return jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def _split(flat):
  """A two-leaf tree (one bf16 leaf) from a flat vector of 37 entries."""
  return {"a": flat[:30].reshape(5, 6), "b": flat[30:].astype(jnp.bfloat16)}


def _join(tree, n):
  return np.concatenate([np.asarray(tree["a"], np.float32).reshape(n, -1),
                         np.asarray(tree["b"], np.float32).reshape(n, -1)], 1)


def _all_votes(n, tie):
  """One jitted shard_map computing every (transport, with alive) vote."""

  def local(v, alive):
    return {(t, a): jax.tree.map(lambda x: x[None], optax_sign.vote_signs(
        _split(v[0]), "x", tie=tie, transport=t, alive=alive[0] if a else None))
            for t in TRANSPORTS for a in (False, True)}

  return jax.jit(jax.shard_map(local, mesh=_mesh(n), in_specs=(P("x"), P("x")),
                               out_specs=P("x")))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("tie", ["zero", "positive", "negative"])
def test_every_transport_matches_numpy_reference(n, tie):
  rng = np.random.default_rng(n)
  v = rng.integers(-2, 3, size=(n, 37)).astype(np.float32)  # exact zeros
  alive = rng.random(n) < 0.6
  votes = _all_votes(n, tie)(jnp.asarray(v), jnp.asarray(alive))
  for with_alive in (False, True):
    expected = _reference_vote(v, tie, alive if with_alive else np.ones(n, bool))
    for transport in TRANSPORTS:
      out = votes[(transport, with_alive)]
      assert out["a"].dtype == jnp.float32 and out["b"].dtype == jnp.bfloat16
      np.testing.assert_array_equal(_join(out, n), np.tile(expected, (n, 1)),
                                    err_msg=f"{transport} alive={with_alive}")


@pytest.mark.parametrize("tie", ["zero", "positive", "negative"])
def test_pack_unpack_round_trip_and_bit_layout(tie):
  c = 2 if tie == "zero" else 1
  rng = np.random.default_rng(1)
  for d in (1, 7, 8, 9, 37, 100):
    q = _tsign(rng.integers(-1, 2, size=d), tie).astype(np.int8)
    for shape in ((c * -(-d // 8),), (3, c * -(-d // 24))):
      packed = _communication._pack(jnp.asarray(q), tie, shape)
      assert packed.shape == shape and packed.dtype == jnp.uint8
      np.testing.assert_array_equal(
          _communication._unpack(packed, d, tie, jnp.int8), q)
  # With B = 2 bytes, coordinates 2 and 3 are lane 1 of bytes 0 and 1: bit
  # 1 (q > 0), or bits 2 (q > 0) and 3 (q < 0) for tie="zero".
  q = np.zeros(16 // c, np.int8)
  q[2], q[3] = 1, -1
  packed = np.asarray(_communication._pack(jnp.asarray(q), tie, (2,)))
  np.testing.assert_array_equal(packed, [4, 8] if c == 2 else [2, 0])


@pytest.mark.parametrize("transport", ["allgather", "alltoall"])
@pytest.mark.parametrize("tie", ["zero", "positive"])
def test_packed_votes_compile_to_elementwise_passes(transport, tie):
  """No reduction, transpose or iota-shift around the collectives; the only
  concatenations join the 1-D bit lanes."""
  f = jax.jit(jax.shard_map(
      lambda g: optax_sign.vote_signs(g[0], "x", tie=tie, transport=transport),
      mesh=_mesh(8), in_specs=P("x"), out_specs=P()))
  text = f.lower(jax.ShapeDtypeStruct((8, 4096), jnp.float32)).compile(
  ).as_text()
  for line in text.splitlines():
    for op in (" reduce(", " transpose(", " iota("):
      assert op not in line, line
    if " concatenate(" in line:
      assert "," not in line.split(" = ", 1)[1].split("{")[0], line


@pytest.mark.parametrize("tie", ["zero", "positive"])
@pytest.mark.parametrize("picked, ops", [
    ("allgather", ["all-gather"]), ("alltoall", ["all-to-all", "all-gather"])])
def test_auto_gives_the_bits_of_the_transport_it_picks(tie, picked, ops,
                                                       monkeypatch):
  """With the CPU thresholds lowered "auto" runs the packed transports."""
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU cost model")
  monkeypatch.setattr(_communication, "_CPU_ALLGATHER_FROM", 1)
  monkeypatch.setattr(_communication, "_CPU_ALLTOALL_FROM",
                      1 if picked == "alltoall" else 10**9)
  n, rng = 8, np.random.default_rng(7)
  v = rng.integers(-2, 3, size=(n, 37)).astype(np.float32)
  alive = rng.random(n) < 0.6
  assert _communication.choose_transport("auto", n, 37, tie) == picked
  votes = _all_votes(n, tie)(jnp.asarray(v), jnp.asarray(alive))
  for with_alive in (False, True):
    expected = _reference_vote(v, tie, alive if with_alive else np.ones(n, bool))
    for transport in ("auto", picked):
      np.testing.assert_array_equal(_join(votes[(transport, with_alive)], n),
                                    np.tile(expected, (n, 1)))
  f = jax.shard_map(lambda g: optax_sign.vote_signs(g[0], "x", tie=tie),
                    mesh=_mesh(n), in_specs=P("x"), out_specs=P())
  report = optax_sign.communication_bytes(
      f, jax.ShapeDtypeStruct((n, 37), jnp.float32))
  assert [c.op for c in report.collectives] == ops


@pytest.mark.parametrize("transport", ["psum", "allgather", "alltoall"])
def test_replicated_alive_vector_under_named_vmap(transport):
  rng = np.random.default_rng(0)
  v = rng.integers(-1, 2, size=(5, 37)).astype(np.float32)
  alive = np.array([True, False, True, True, False])
  for tie in ("zero", "positive"):
    vote = jax.jit(jax.vmap(lambda x, t=tie: optax_sign.vote_signs(
        _split(x), "i", tie=t, transport=transport, alive=jnp.asarray(alive)),
                            axis_name="i"))(jnp.asarray(v))
    np.testing.assert_array_equal(
        _join(vote, 5), np.tile(_reference_vote(v, tie, alive), (5, 1)))
    # Masking workers equals removing them.
    kept = jax.jit(jax.vmap(lambda x, t=tie: optax_sign.vote_signs(
        _split(x), "i", tie=t, transport=transport), axis_name="i"))(
            jnp.asarray(v[alive]))
    np.testing.assert_array_equal(_join(kept, 3)[0], _join(vote, 5)[0])


def test_single_worker_and_odd_count_properties():
  v = jnp.array([[2.0, 0.0, -1.0, 0.0], [1.0, -3.0, 0.0, 0.0],
                 [-1.0, 0.5, 0.0, 4.0]])
  for tie in ("zero", "positive", "negative"):
    one = jax.vmap(lambda x, t=tie: optax_sign.vote_signs(x, "i", tie=t),
                   axis_name="i")(v[:1])
    np.testing.assert_array_equal(one[0], optax_sign.tie_sign(v[0], tie))
    np.testing.assert_array_equal(optax_sign.vote_signs(v[0], None, tie=tie),
                                  optax_sign.tie_sign(v[0], tie))
  odd = jax.vmap(lambda x: optax_sign.vote_signs(x, "i", tie="negative"),
                 axis_name="i")(v)
  assert np.all(np.asarray(odd) != 0)


def test_int8_holds_127_workers_and_128_selects_int16():
  assert _communication.count_dtype(127) == jnp.int8
  assert _communication.count_dtype(128) == jnp.int16
  assert _communication.count_dtype(40000) == jnp.int32
  for n in (127, 128):
    ones = jnp.ones((n, 3))
    count = jax.vmap(lambda x: optax_sign.mean_of_signs("i").update(
        x, optax_sign.mean_of_signs("i").init(x))[0], axis_name="i")(ones)
    np.testing.assert_array_equal(count, np.ones((n, 3)))  # S = N exactly
    text = jax.jit(jax.vmap(lambda x: optax_sign.vote_signs(
        x, "i", transport="psum"), axis_name="i")).lower(ones).as_text()
    # The messages are int8 either way; the count widens only past 127.
    assert ("i16" in text) == (n == 128)


def test_mean_of_signs_matches_numpy_and_masks():
  rng = np.random.default_rng(3)
  v = rng.integers(-1, 2, size=(4, 37)).astype(np.float32)
  alive = np.array([True, True, False, True])
  for transport in ("psum", "allgather"):
    tx = optax_sign.mean_of_signs("i", transport=transport)
    mean = jax.vmap(lambda x, a, tx=tx: tx.update(_split(x), tx.init(x),
                                                  alive=a)[0],
                    axis_name="i")(jnp.asarray(v), jnp.asarray(alive))
    expected = (np.sign(v) * alive[:, None]).sum(0) / 3
    np.testing.assert_allclose(_join(mean, 4)[0, :30], expected[:30],
                               rtol=1e-6)
    none_alive = jax.vmap(lambda x, tx=tx: tx.update(
        x, tx.init(x), alive=jnp.bool_(False))[0], axis_name="i")(
            jnp.asarray(v))
    np.testing.assert_array_equal(none_alive, np.zeros_like(v))


def test_bytes_sent_is_logged_in_state():
  tx = optax_sign.majority_vote("i", transport="alltoall", tie="positive")
  grads = jnp.ones((8, 64))
  _, state = jax.vmap(lambda g: tx.update(g, tx.init(g)), axis_name="i")(grads)
  np.testing.assert_allclose(optax.tree.get(state, "bytes_sent"),
                             np.full(8, 64 * 7 / 32))


def test_bytes_sent_does_not_drift_over_many_steps():
  tx = optax_sign.majority_vote("i", transport="psum")
  grads = jnp.ones((2, 3_000_000))
  state = jax.vmap(tx.init)(grads)
  state = state._replace(count=jnp.full((2,), 2**20, jnp.int32))
  _, state = jax.vmap(tx.update, axis_name="i")(grads, state)
  per_step = optax_sign.vote_bytes("psum", 2, 3_000_000, "zero")
  np.testing.assert_allclose(state.bytes_sent, (2**20 + 1) * per_step,
                             rtol=1e-6)


@pytest.mark.parametrize("tie", ["zero", "positive"])
def test_non_finite_worker_dropped_with_alive_keeps_workers_identical(tie):
  rng = np.random.default_rng(3)
  grads = jnp.asarray(rng.normal(size=(4, 33)), jnp.float32)
  bad = grads.at[0, 5].set(jnp.nan)
  tx = optax_sign.majority_vote("i", transport="allgather", tie=tie)

  def step(g):
    finite = jnp.all(jnp.isfinite(g))
    return tx.update(g, tx.init(g), alive=finite)[0]

  votes = jax.jit(jax.vmap(step, axis_name="i"))(bad)
  assert np.all(np.isfinite(votes))
  np.testing.assert_array_equal(votes, np.broadcast_to(votes[0], votes.shape))
  # Equal to the vote of the three healthy workers alone.
  alive = np.array([False, True, True, True])
  np.testing.assert_array_equal(
      votes[0], _reference_vote(np.asarray(grads), tie, alive))


def test_clear_errors():
  grads = {"w": jnp.ones(4)}
  with pytest.raises(ValueError, match="axis_name='nope' is not bound"):
    jax.jit(lambda g: optax_sign.vote_signs(g, "nope"))(grads)
  tx = optax_sign.majority_vote("nope")
  with pytest.raises(ValueError, match="shard_map"):
    jax.jit(lambda g: tx.update(g, tx.init(g)))(grads)
  with pytest.raises(ValueError, match="transport"):
    optax_sign.majority_vote("i", transport="ring")
  with pytest.raises(ValueError, match="tie"):
    optax_sign.majority_vote("i", tie="up")
  # The mean needs counts; the all-to-all transport only carries votes.
  with pytest.raises(ValueError, match="transport"):
    optax_sign.mean_of_signs("i", transport="alltoall")
  with pytest.raises(ValueError, match="alive"):
    jax.vmap(lambda g: optax_sign.vote_signs(g, "i", alive=jnp.ones(3, bool)),
             axis_name="i")(jnp.ones((4, 2)))


# ---------------------------------------------------------------------------
# 50 steps under shard_map, pmap and named vmap: bitwise equal.

_N = 8
_W_TRUE = jnp.linspace(-1.0, 1.0, 10)


def _worker_data():
  x = jax.random.normal(jax.random.key(0), (_N, 16, 10))
  y = x @ _W_TRUE + 0.3 * jax.random.normal(jax.random.key(1), (_N, 16))
  return x, y


def _loss(params, x, y):
  pred = x @ params["w"] + params["b"]
  return jnp.mean((pred - y) ** 2)


def _make_opt(transport):
  return optax.chain(optax_sign.majority_vote("x", transport=transport),
                     optax.scale_by_learning_rate(0.01))


def _local_steps(opt, params, state, x, y, steps=50):
  def body(carry, _):
    params, state = carry
    grads = jax.grad(_loss)(optax_sign.per_worker(params, "x"), x, y)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), updates
  (params, state), updates = lax.scan(body, (params, state), None, length=steps)
  return params, jax.tree.map(lambda u: u[-1], updates)


def _params0():
  return {"w": jnp.zeros(10), "b": jnp.zeros(())}


@pytest.mark.parametrize("transport", ["psum", "allgather", "alltoall"])
def test_shard_map_pmap_vmap_agree_bitwise_over_50_steps(transport):
  opt = _make_opt(transport)
  x, y = _worker_data()
  params0 = _params0()
  state0 = opt.init(params0)
  run = functools.partial(_local_steps, opt)

  mesh = _mesh(_N)
  sm = jax.jit(jax.shard_map(
      lambda p, s, x, y: run(p, s, x[0], y[0]), mesh=mesh,
      in_specs=(P(), P(), P("x"), P("x")), out_specs=(P(), P())))
  sm_params, sm_updates = sm(params0, state0, x, y)

  bcast = lambda t: jax.tree.map(lambda a: jnp.stack([a] * _N), t)
  pm_params, pm_updates = jax.pmap(run, axis_name="x")(
      bcast(params0), bcast(state0), x, y)
  vm_params, vm_updates = jax.jit(jax.vmap(run, axis_name="x"))(
      bcast(params0), bcast(state0), x, y)

  for i in range(_N):
    for tree in (pm_params, vm_params):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b),
                   tree, sm_params)
    for tree in (pm_updates, vm_updates):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b),
                   tree, sm_updates)
  assert _loss(sm_params, x[0], y[0]) < 0.5 * _loss(params0, x[0], y[0])


def test_transports_give_same_trajectory():
  x, y = _worker_data()
  results = []
  for transport in ("psum", "allgather", "alltoall"):
    opt = _make_opt(transport)
    params, _ = jax.jit(jax.vmap(functools.partial(_local_steps, opt),
                                 in_axes=(None, None, 0, 0), axis_name="x"))(
                                     _params0(), opt.init(_params0()), x, y)
    results.append(params)
  for other in results[1:]:
    jax.tree.map(np.testing.assert_array_equal, other, results[0])


# ---------------------------------------------------------------------------
# The shard_map gradient trap.

def _trap_step(fix):
  opt = _make_opt("alltoall")
  x, y = _worker_data()

  def local(params, state, x, y):
    p = optax_sign.per_worker(params, "x") if fix else params
    grads = jax.grad(_loss)(p, x[0], y[0])
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.shard_map(local, mesh=_mesh(_N),
                       in_specs=(P(), P(), P("x"), P("x")),
                       out_specs=(P(), P()))
  return step, (_params0(), opt.init(_params0()), x, y)


def test_gradient_trap_is_visible_in_hlo_and_fixed_by_per_worker():
  step, args = _trap_step(fix=False)
  trapped = optax_sign.communication_bytes(step, *args)
  float_reduces = [c for c in trapped.collectives
                   if c.op == "all-reduce" and c.dtype == "f32"]
  assert sum(c.elements for c in float_reduces) >= 11  # the whole gradient
  step, args = _trap_step(fix=True)
  fixed = optax_sign.communication_bytes(step, *args)
  assert not [c for c in fixed.collectives if c.dtype.startswith(("f", "bf"))]
  assert {c.op for c in fixed.collectives} == {"all-to-all", "all-gather"}


def test_per_worker_is_identity_under_pmap_and_vmap():
  tree = {"w": jnp.arange(8.0).reshape(8, 1)}
  out = jax.vmap(lambda t: optax_sign.per_worker(t, "i"), axis_name="i")(tree)
  np.testing.assert_array_equal(out["w"], tree["w"])
  out = jax.pmap(lambda t: optax_sign.per_worker(t, "i"), axis_name="i")(tree)
  np.testing.assert_array_equal(out["w"], tree["w"])
  with pytest.raises(ValueError, match="not bound"):
    optax_sign.per_worker(tree, "i")


# ---------------------------------------------------------------------------
# Byzantine robustness on a real dataset.

def _breast_cancer_shards():
  datasets = pytest.importorskip("sklearn.datasets")
  x, y = datasets.load_breast_cancer(return_X_y=True)
  x = (x - x.mean(0)) / x.std(0)
  x = np.concatenate([x, np.ones((len(x), 1))], 1).astype(np.float32)
  m = (len(x) // _N) * _N
  rng = np.random.default_rng(0)
  order = rng.permutation(len(x))[:m]
  return (jnp.asarray(x[order].reshape(_N, -1, x.shape[1])),
          jnp.asarray(y[order].reshape(_N, -1).astype(np.float32)),
          jnp.asarray(x), jnp.asarray(y))


def _logistic_loss(w, x, y):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ w, y))


@functools.partial(jax.jit, static_argnames=("vote", "steps"))
def _byzantine_run(xs, ys, alive, vote, steps=150):
  """8 workers, the last 3 adversarial; returns the final weights."""
  bad = jnp.arange(_N) >= _N - 3
  if vote:
    opt = optax.chain(optax_sign.majority_vote("x"),
                      optax.scale_by_learning_rate(0.01))
  else:
    opt = optax.sgd(0.5)

  def worker(x, y, is_bad, a):
    w = jnp.zeros(x.shape[1])
    state = opt.init(w)

    def body(carry, _):
      w, state = carry
      g = jax.grad(_logistic_loss)(w, x, y)
      if vote:  # flipped sign: the negation of its honest message
        g = jnp.where(is_bad, -g, g)
        u, state = opt.update(g, state, w, alive=a)
      else:  # plain averaging; adversaries send -3 g
        g = lax.pmean(jnp.where(is_bad, -3.0 * g, g), "x")
        u, state = opt.update(g, state, w)
      return (optax.apply_updates(w, u), state), None

    (w, _), _ = lax.scan(body, (w, state), None, length=steps)
    return w

  return jax.vmap(worker, axis_name="x")(xs, ys, bad, alive)[0]


def _accuracy(w, x, y):
  return float(jnp.mean((x @ w > 0) == (y > 0.5)))


def test_majority_vote_survives_sign_flippers_where_averaging_fails():
  xs, ys, x, y = _breast_cancer_shards()
  alive = jnp.ones(_N, bool)
  vote_acc = _accuracy(_byzantine_run(xs, ys, alive, vote=True), x, y)
  mean_acc = _accuracy(_byzantine_run(xs, ys, alive, vote=False), x, y)
  assert vote_acc >= 0.95, vote_acc
  assert mean_acc < 0.6, mean_acc
  # Masking one honest and one adversarial worker: 4 honest against 2.
  masked = alive.at[0].set(False).at[_N - 1].set(False)
  masked_acc = _accuracy(_byzantine_run(xs, ys, masked, vote=True), x, y)
  assert masked_acc >= 0.9, masked_acc


@pytest.mark.parametrize("tie", ["positive", "negative"])
def test_no_live_worker_makes_no_step(tie):
  """With a two-valued tie a vote of nobody would be +-1 everywhere."""
  rng = np.random.default_rng(5)
  v = rng.normal(size=(4, 37)).astype(np.float32)
  for alive in (np.zeros(4, bool), np.array([False, True, False, False])):
    votes = _all_votes(4, tie)(jnp.asarray(v), jnp.asarray(alive))
    expected = _reference_vote(v, tie, alive) * alive.any()
    for transport in TRANSPORTS:
      np.testing.assert_array_equal(_join(votes[(transport, True)], 4),
                                    np.tile(expected, (4, 1)),
                                    err_msg=f"{transport} alive={alive}")
  dead = jnp.zeros(4, bool)  # a replicated mask under a named vmap
  out = jax.vmap(lambda x: optax_sign.vote_signs(
      _split(x), "i", tie=tie, alive=dead), axis_name="i")(jnp.asarray(v))
  np.testing.assert_array_equal(_join(out, 4), np.zeros((4, 37)))


@pytest.mark.parametrize("args, match", [
    (("psum", 0, 10), "num_workers must be an integer >= 1"),
    (("alltoall", 2.5, 10), "num_workers must be an integer >= 1"),
    (("allgather", 4, -1), "size must be an integer >= 0"),
    (("psum", 4, 10, "maybe"), "tie must be one of"),
    (("ring", 4, 10), "transport must be one of"),
])
def test_vote_bytes_rejects_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    optax_sign.vote_bytes(*args)


def test_vote_bytes_accepts_numpy_integers():
  assert optax_sign.vote_bytes("psum", np.int64(4), np.prod((3, 4))) == (
      optax_sign.vote_bytes("psum", 4, 12))
