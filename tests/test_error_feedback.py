"""Specification tests for error-feedback sign compression (one and N workers)."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import optax_sign

_N = 4


def _grads(key, n=None):
  shape = () if n is None else (n,)
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, shape + (3, 5)),
          "b": jax.random.normal(k2, shape + (4,))}


def test_single_worker_telescoping_and_contraction():
  tx = optax_sign.scale_by_error_feedback_sign()
  grads = [_grads(jax.random.key(i)) for i in range(6)]
  state = tx.init(grads[0])
  total_u = jax.tree.map(jnp.zeros_like, grads[0])
  update = jax.jit(tx.update)
  for g in grads:
    e = state.error
    p = jax.tree.map(jnp.add, g, e)
    u, state = update(g, state)
    total_u = jax.tree.map(jnp.add, total_u, u)
    for pl, ul, el in zip(jax.tree.leaves(p), jax.tree.leaves(u),
                          jax.tree.leaves(state.error)):
      # Least-squares scale and the contraction identity of the residual.
      n = pl.size
      np.testing.assert_allclose(np.abs(ul), np.sum(np.abs(pl)) / n, rtol=1e-6)
      delta = np.sum(np.abs(pl)) ** 2 / (n * np.sum(pl ** 2))
      assert 1.0 / n <= delta <= 1.0
      np.testing.assert_allclose(np.sum(el ** 2), (1 - delta) * np.sum(pl ** 2),
                                 rtol=1e-4)
  total_g = jax.tree.map(lambda *x: sum(x), *grads)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a + b, c, atol=1e-5),
               total_u, state.error, total_g)


def test_zero_input_gives_zero_update():
  tx = optax_sign.scale_by_error_feedback_sign()
  zeros = {"w": jnp.zeros((2, 3))}
  u, state = tx.update(zeros, tx.init(zeros))
  np.testing.assert_array_equal(u["w"], 0.0)
  np.testing.assert_array_equal(state.error["w"], 0.0)


def _multi_worker_run(grads_per_step, axis_tx):
  """Runs under named vmap; returns updates [steps, N, ...] and final state."""

  def worker(gs):
    state = axis_tx.init(jax.tree.map(lambda x: x[0], gs))

    def body(state, g):
      u, state = axis_tx.update(g, state)
      return state, u

    state, us = jax.lax.scan(body, state, gs)
    return us, state

  return jax.jit(jax.vmap(worker, axis_name="i"))(grads_per_step)


def test_mean_of_scaled_signs_matches_numpy_and_keeps_error_per_worker():
  steps = 3
  keys = jax.random.split(jax.random.key(0), steps)
  # grads: leaves [N, steps, ...] (worker-major for vmap).
  per_step = [_grads(k, _N) for k in keys]
  grads = jax.tree.map(lambda *x: jnp.stack(x, axis=1), *per_step)
  tx = optax_sign.scale_by_error_feedback_sign(axis_name="i")
  updates, state = _multi_worker_run(grads, tx)

  error = {k: np.zeros(v.shape[:1] + v.shape[2:], np.float32)
           for k, v in grads.items()}
  for t in range(steps):
    for k in grads:
      p = np.asarray(grads[k][:, t]) + error[k]
      alpha = np.abs(p).reshape(_N, -1).mean(1).reshape((_N,) + (1,) *
                                                         (p.ndim - 1))
      c = alpha * np.where(p >= 0, 1.0, -1.0)
      error[k] = p - c
      expected = c.mean(0)
      for i in range(_N):  # every worker gets the same mean
        np.testing.assert_allclose(updates[k][i, t], expected, rtol=1e-5,
                                   atol=1e-6)
      np.testing.assert_array_equal(updates[k][0, t], updates[k][_N - 1, t])
  for k in grads:
    np.testing.assert_allclose(state.error[k], error[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(state.error[k][0], state.error[k][1])  # per worker


def test_multi_worker_sends_bits_and_one_scale_per_leaf():
  d, leaves = 4096 + 7, 2
  tx = optax_sign.scale_by_error_feedback_sign(axis_name="x")
  mesh = jax.make_mesh((_N,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:_N])

  def local(g, error):
    grads = {"a": g[0, :4096], "b": g[0, 4096:]}
    state = optax_sign.ErrorFeedbackState(
        error=jax.tree.map(lambda e: e[0], error))
    u, state = tx.update(grads, state)
    return u, jax.tree.map(lambda e: e[None], state.error)

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P("x")),
                    out_specs=(P(), P("x")))
  error = {"a": jax.ShapeDtypeStruct((_N, 4096), jnp.float32),
           "b": jax.ShapeDtypeStruct((_N, 7), jnp.float32)}
  report = optax_sign.communication_bytes(
      f, jax.ShapeDtypeStruct((_N, d), jnp.float32), error)
  [coll] = report.collectives
  assert (coll.op, coll.dtype) == ("all-gather", "u8")
  assert report.total_bytes == (_N - 1) * (-(-d // 8) + 4 * leaves)


def test_unbound_axis_is_a_clear_error():
  tx = optax_sign.scale_by_error_feedback_sign(axis_name="nope")
  g = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="not bound"):
    tx.update(g, tx.init(g))


def _ef_reference(g, e, alive):
  """NumPy EF across workers, the live workers only: [N, d] leaves."""
  p = g + e
  scale = np.abs(p).mean(axis=1, keepdims=True)
  c = scale * np.where(p >= 0, 1.0, -1.0)
  live = alive.sum()
  mean = (c[alive].sum(0) / live) if live else np.zeros(p.shape[1])
  new_e = np.where(alive[:, None], p - c, e)
  return mean.astype(np.float32), new_e.astype(np.float32)


@pytest.mark.parametrize("dead", [(), (1,), (0, 3, 5), tuple(range(8))])
def test_alive_excludes_dead_and_nan_workers(dead):
  """Dead workers (here with NaN or 1e6-scaled gradients) change nothing:
  the update is the live workers' mean, their residuals stay."""
  n = 8
  rng = np.random.default_rng(len(dead))
  g = rng.normal(size=(n, 12)).astype(np.float32)
  e = rng.normal(size=(n, 12)).astype(np.float32) * 0.1
  alive = np.ones(n, bool)
  alive[list(dead)] = False
  g_sent = g.copy()
  for k, i in enumerate(dead):
    g_sent[i] = np.nan if k % 2 == 0 else 1e6 * g[i]
  tx = optax_sign.scale_by_error_feedback_sign(axis_name="i")

  def worker(g, e, a):
    state = optax_sign.ErrorFeedbackState(error={"w": e})
    u, state = tx.update({"w": g}, state, alive=a)
    return u["w"], state.error["w"]

  u, new_e = jax.jit(jax.vmap(worker, axis_name="i"))(
      jnp.asarray(g_sent), jnp.asarray(e), jnp.asarray(alive))
  expected_u, expected_e = _ef_reference(g, e, alive)
  for i in range(n):
    np.testing.assert_allclose(np.asarray(u[i]), expected_u, rtol=1e-5,
                               atol=1e-7)
  np.testing.assert_allclose(np.asarray(new_e), expected_e, rtol=1e-5,
                             atol=1e-6)
  assert np.all(np.isfinite(np.asarray(u)))


def test_single_worker_dead_step_keeps_the_residual():
  tx = optax_sign.scale_by_error_feedback_sign()
  state = tx.init({"w": jnp.zeros(3)})
  u, state = tx.update({"w": jnp.array([1.0, -2.0, 3.0])}, state)
  bad = {"w": jnp.array([jnp.nan, 1.0, 2.0])}
  u2, state2 = tx.update(bad, state, alive=jnp.all(jnp.isfinite(bad["w"])))
  np.testing.assert_array_equal(u2["w"], np.zeros(3))
  np.testing.assert_array_equal(state2.error["w"], state.error["w"])
  del u


def test_scale_does_not_overflow_near_the_float32_limit():
  """||p||_1 / n of values near 3e38: each term is divided by n before the
  sum, so the scale is the mean (a plain float32 sum would be inf)."""
  g = {"w": jnp.full((1000,), 1e37, jnp.float32).at[::2].multiply(-2.0)}
  with np.errstate(over="ignore"):  # a float32 sum of the magnitudes is inf
    assert not np.isfinite(np.sum(np.abs(np.asarray(g["w"]))))
  tx = optax_sign.scale_by_error_feedback_sign()
  u, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(np.abs(np.asarray(u["w"])), 1.5e37, rtol=1e-5)
  np.testing.assert_array_equal(np.sign(u["w"]), np.sign(g["w"]))
  assert np.all(np.isfinite(state.error["w"]))
