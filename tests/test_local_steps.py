"""Tests of the local-steps wrapper, its outer steps and presets."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_sign
from optax_sign import _sign

N = 4  # workers
PARAMS0 = {"w": jnp.linspace(-0.5, 0.7, 12, dtype=jnp.float32).reshape(3, 4),
           "b": jnp.array([0.3, -0.2, 0.1], jnp.float32)}
NUM_PARAMS = 15


def _targets(dtype=jnp.float32):
  """Per-worker targets (leading worker axis): heterogeneous local losses."""
  k1, k2 = jax.random.split(jax.random.key(42))
  return {"w": jax.random.normal(k1, (N, 3, 4)).astype(dtype),
          "b": jax.random.normal(k2, (N, 3)).astype(dtype)}


def _loss(params, target):
  terms = jax.tree.map(lambda x, c: 0.5 * jnp.sum((x - c) ** 2 * (1 + c**2)),
                       params, target)
  return sum(jax.tree.leaves(terms))


def _worker_loop(opt, steps):
  """Per-worker training loop: ``steps`` local steps on the worker's target."""

  def loop(params, state, target):
    def body(_, carry):
      params, state = carry
      grads = jax.grad(_loss)(params, target)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, steps, body, (params, state))

  return loop


def _stack(tree, n=N):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def run_vmap(opt, steps, params0=PARAMS0, targets=None):
  """Named-vmap simulation of N workers; returns stacked (params, state)."""
  targets = _targets() if targets is None else targets
  state = _stack(opt.init(params0))
  loop = jax.vmap(_worker_loop(opt, steps), axis_name="x")
  return jax.jit(loop)(_stack(params0), state, targets)


def _shard_map_specs():
  return optax_sign.LocalStepsState(count=P(), anchor=P(), inner_state=P("x"),
                                    outer_state=P())


def _shard_map_fn(opt, steps, mesh):
  loop = _worker_loop(opt, steps)
  spec = _shard_map_specs()

  def per_device(params, state, target):
    squeeze = lambda t: jax.tree.map(lambda x: x[0], t)
    expand = lambda t: jax.tree.map(lambda x: x[None], t)
    state = state._replace(inner_state=squeeze(state.inner_state))
    params, state = loop(squeeze(params), state, squeeze(target))
    return expand(params), state._replace(inner_state=expand(state.inner_state))

  return jax.jit(jax.shard_map(per_device, mesh=mesh,
                               in_specs=(P("x"), spec, P("x")),
                               out_specs=(P("x"), spec)))


def _mesh(n=N):
  return jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def _shard_map_args(opt, params0=PARAMS0, targets=None):
  targets = _targets() if targets is None else targets
  state = opt.init(params0)
  state = state._replace(inner_state=_stack(state.inner_state))
  return _stack(params0), state, targets


def run_shard_map(opt, steps, params0=PARAMS0, targets=None):
  """shard_map run; the state's replicated parts come back unstacked."""
  fn = _shard_map_fn(opt, steps, _mesh())
  return fn(*_shard_map_args(opt, params0, targets))


def run_pmap(opt, steps, params0=PARAMS0, targets=None):
  targets = _targets() if targets is None else targets
  state = _stack(opt.init(params0))
  loop = jax.pmap(_worker_loop(opt, steps), axis_name="x",
                  devices=jax.devices()[:N])
  return loop(_stack(params0), state, targets)


def _dsm(sync_every=3, lr=0.05, **kw):
  kw.setdefault("weight_decay", 0.1)
  return optax_sign.dsm_ls(lr, inner=optax.adam(lr), sync_every=sync_every,
                           axis_name="x", **kw)


def _assert_bitwise(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      np.asarray(x), np.asarray(y)), a, b)


# ---------------------------------------------------------------- validation


def test_invalid_arguments_raise():
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="sync_every"):
    optax_sign.local_steps(sgd, sgd, sync_every=0, pseudo_grad_scale="none")
  with pytest.raises(ValueError, match="pseudo_grad_scale"):
    optax_sign.local_steps(sgd, sgd, 2, pseudo_grad_scale="gamma")
  with pytest.raises(ValueError, match="inner_learning_rate"):
    optax_sign.local_steps(sgd, sgd, 2)
  with pytest.raises(ValueError, match="inner_learning_rate"):
    optax_sign.local_steps(sgd, sgd, 2, inner_learning_rate=-1.0)
  with pytest.raises(ValueError, match="weight_decay"):
    optax_sign.global_sign_momentum(weight_decay=-0.1)
  with pytest.raises(ValueError, match="b1"):
    optax_sign.dsm_ls(0.1, b1=1.5)
  with pytest.raises(ValueError, match="momentum"):
    optax_sign.slowmo(0.1, momentum=-0.5)
  opt = optax_sign.dsm_ls(0.1)
  state = opt.init(PARAMS0)
  with pytest.raises(ValueError, match="params"):
    opt.update(PARAMS0, state)
  with pytest.raises(ValueError, match="LocalStepsState"):
    optax_sign.local_steps_anchor(optax.adam(0.1).init(PARAMS0))
  with pytest.raises(ValueError, match="axis_name"):
    optax_sign.broadcast_params(PARAMS0, None)


def test_anchor_helper_finds_nested_state_and_is_fp32():
  opt = optax.inject_hyperparams(
      lambda lr: optax_sign.dsm_ls(lr, inner=optax.sgd(lr)))(lr=0.1)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS0)
  state = opt.init(params)
  anchor = optax_sign.local_steps_anchor(state)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(anchor))
  chex.assert_trees_all_equal(anchor, jax.tree.map(
      lambda x: x.astype(jnp.float32), params))


# ----------------------------------------------------------- the algorithm


def test_sign_convention_and_round_step_size():
  """f = c^T x with c > 0: every anchor coordinate decreases by exactly eta*gamma."""
  lr, eta, wd = 0.01, 1.0, 0.0
  cs = {"w": 1.0 + jnp.arange(N * 12.0).reshape(N, 3, 4),
        "b": 0.5 + jnp.arange(N * 3.0).reshape(N, 3)}
  opt = optax_sign.dsm_ls(lr, inner=optax.adam(lr), sync_every=3,
                          axis_name="x", weight_decay=wd, learning_rate=eta)
  linear = lambda p, c: sum(jax.tree.leaves(
      jax.tree.map(lambda x, y: jnp.sum(x * y), p, c)))

  def loop(params, state, c):
    for _ in range(3):
      updates, state = opt.update(jax.grad(linear)(params, c), state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  step = jax.jit(jax.vmap(loop, axis_name="x"))
  params, state = _stack(PARAMS0), _stack(opt.init(PARAMS0))
  prev = PARAMS0
  for _ in range(3):
    params, state = step(params, state, cs)
    anchor = jax.tree.map(lambda x: x[0], state.anchor)
    jax.tree.map(lambda a, p: np.testing.assert_allclose(
        a - p, -eta * lr, rtol=1e-4), anchor, prev)
    prev = anchor


def test_round_moves_anchor_by_exactly_eta_gamma_with_decay():
  lr, eta, wd = 0.05, 0.5, 0.2
  params, state = run_vmap(_dsm(3, lr, learning_rate=eta, weight_decay=wd), 3)
  anchor = jax.tree.map(lambda x: x[0], state.anchor)
  mask = optax_sign.matrix_mask(PARAMS0)
  for a, x0, m in zip(jax.tree.leaves(anchor), jax.tree.leaves(PARAMS0),
                      jax.tree.leaves(mask)):
    decayed = x0 * (1 - eta * lr * wd) if m else x0
    np.testing.assert_allclose(jnp.max(jnp.abs(a - decayed)), eta * lr,
                               rtol=1e-5)
  # Workers sit on the anchor after the sync (one rounding of p + (a - p)).
  for w in range(N):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[w], params), anchor,
                                rtol=0, atol=1e-7)


def test_gamma_zero_makes_no_outer_step_and_no_nan():
  sched = lambda count: jnp.where(count < 2, 0.0, 0.1)
  opt = optax_sign.dsm_ls(sched, inner=optax.sgd(sched), sync_every=1,
                          axis_name="x")
  params, state = run_vmap(opt, 2)
  chex.assert_tree_all_finite(state)
  chex.assert_trees_all_equal(
      jax.tree.map(lambda x: x[0], state.anchor), PARAMS0)
  chex.assert_trees_all_equal(
      optax.tree.get(state.outer_state, "mu"),
      jax.tree.map(jnp.zeros_like, _stack(PARAMS0)))
  params, state = run_vmap(opt, 4)
  chex.assert_tree_all_finite(state)
  assert not np.array_equal(state.anchor["w"][0], PARAMS0["w"])


def test_zero_gradients_and_bf16_give_no_nan():
  opt = optax_sign.dsm_ls(0.1, sync_every=2)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS0)
  state = opt.init(params)
  step = jax.jit(opt.update)
  for _ in range(4):
    updates, state = step(jax.tree.map(jnp.zeros_like, params), state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    params = optax.apply_updates(params, updates)
  chex.assert_tree_all_finite((params, state))


def test_inner_state_is_never_averaged_or_reset():
  lr = 0.05
  opt = _dsm(3, lr)
  targets = _targets()
  step = jax.jit(jax.vmap(_worker_loop(opt, 1), axis_name="x"))
  params, state = _stack(PARAMS0), _stack(opt.init(PARAMS0))
  trajectory = []  # worker 0's parameters before each step
  for _ in range(7):
    trajectory.append(jax.tree.map(lambda x: x[0], params))
    params, state = step(params, state, targets)
  # Per-worker inner moments differ (no averaging), count runs on (no reset).
  assert int(optax.tree.get(state.inner_state, "count")[0]) == 7
  mu = optax.tree.get(state.inner_state, "mu")["w"]
  assert not np.allclose(mu[0], mu[1])
  # Replaying Adam alone on worker 0's gradients gives its inner state.
  inner = optax.adam(lr)
  s_inner = inner.init(PARAMS0)
  for p in trajectory:
    grads = jax.grad(_loss)(p, jax.tree.map(lambda x: x[0], targets))
    _, s_inner = inner.update(grads, s_inner, p)
  chex.assert_trees_all_close(
      s_inner, jax.tree.map(lambda x: x[0], state.inner_state),
      rtol=1e-6, atol=1e-8)


def test_weight_decay_once_on_anchor_with_matrix_mask():
  """Zero gradients: only the decay moves the anchor, once per round."""
  lr, eta, wd = 0.1, 1.0, 0.5
  opt = optax_sign.dsm_ls(lr, inner=optax.sgd(lr), sync_every=2,
                          weight_decay=wd, learning_rate=eta)
  state = opt.init(PARAMS0)
  params = PARAMS0
  for _ in range(4):
    updates, state = opt.update(jax.tree.map(jnp.zeros_like, params), state,
                                params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(state.anchor["w"],
                             PARAMS0["w"] * (1 - eta * lr * wd) ** 2, rtol=1e-6)
  np.testing.assert_array_equal(state.anchor["b"], PARAMS0["b"])


def test_global_sign_momentum_equals_optax_lion_with_mask():
  outer = optax_sign.global_sign_momentum(0.3, 0.9, 0.99, 0.2)
  lion = optax.lion(0.3, 0.9, 0.99, weight_decay=0.2,
                    mask=optax_sign.matrix_mask)
  s1, s2 = outer.init(PARAMS0), lion.init(PARAMS0)
  params = PARAMS0
  for i in range(5):
    g = jax.tree.map(lambda x: jax.random.normal(
        jax.random.fold_in(jax.random.key(i), x.size), x.shape), params)
    u1, s1 = outer.update(g, s1, params)
    u2, s2 = lion.update(g, s2, params)
    _assert_bitwise(u1, u2)
    params = optax.apply_updates(params, u1)
  assert optax_sign.matrix_mask(PARAMS0) == {"w": True, "b": False}


def test_randomized_outer_sign_is_replicated_across_workers():
  opt = _dsm(3, 0.05, key=jax.random.key(7), bound=3.0)
  _, state = run_vmap(opt, 6)
  for w in range(1, N):
    _assert_bitwise(jax.tree.map(lambda x: x[w], state.anchor), _anchor0(state))
  _, hard = run_vmap(_dsm(3, 0.05), 6)
  assert not np.array_equal(state.anchor["w"], hard.anchor["w"])


def test_pseudo_gradient_rescaling_leaves_sign_trajectory_unchanged():
  """With a constant gamma, "inner_lr" (g = D/gamma, step eta*gamma) equals
  "none" (g = D) with global learning rate eta*gamma: the sign ignores c > 0."""
  lr, eta = 0.05, 2.0
  runs = []
  for scale, glr in (("inner_lr", eta), ("none", eta * lr)):
    outer = optax_sign.global_sign_momentum(glr, 0.9, 0.99, 0.0)
    opt = optax_sign.local_steps(optax.adam(lr), outer, 3, "x", scale,
                                 inner_learning_rate=lr)
    runs.append(_anchor0(run_vmap(opt, 9)[1]))
  chex.assert_trees_all_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)


# -------------------------------------------------- reductions (float64)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _f64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _averaged_grad_run(opt, steps):
  """A single optimizer on the workers' mean gradient (the reference)."""
  targets = _f64(_targets())
  params, state = _f64(PARAMS0), opt.init(_f64(PARAMS0))

  @jax.jit
  def step(params, state):
    grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, targets)
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    updates, state = opt.update(mean, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params


def _manual_averaging(lr, sync_every, rounds):
  """Model averaging by hand: SGD from the anchor, then the plain mean."""
  targets = _f64(_targets())
  anchor = _f64(PARAMS0)
  for _ in range(rounds):
    local = _stack(anchor)
    for _ in range(sync_every):
      grads = jax.vmap(jax.grad(_loss))(local, targets)
      local = jax.tree.map(lambda p, g: p - lr * g, local, grads)
    anchor = jax.tree.map(lambda x: jnp.mean(x, axis=0), local)
  return anchor


def _anchor0(state):
  return jax.tree.map(lambda x: x[0], state.anchor)


def test_tau1_sgd_dsm_ls_is_lion_on_averaged_gradients(x64):
  lr, eta, b1, b2, wd = 0.02, 0.5, 0.9, 0.99, 0.1
  opt = optax_sign.local_steps(
      optax.sgd(lr),
      optax_sign.global_sign_momentum(eta, b1, b2, wd, mask=None), 1,
      axis_name="x", inner_learning_rate=lr)
  _, state = run_vmap(opt, 20, _f64(PARAMS0), _f64(_targets()))
  lion = optax.lion(eta * lr, b1, b2, weight_decay=wd)
  chex.assert_trees_all_close(_anchor0(state), _averaged_grad_run(lion, 20),
                              rtol=1e-12, atol=1e-13)


def test_no_sign_zero_betas_is_model_averaging(x64):
  lr = 0.05
  no_sign = optax.chain(_sign.scale_by_lion_momentum(0.0, 0.0),
                        optax.scale_by_learning_rate(1.0))
  opt = optax_sign.local_steps(optax.sgd(lr), no_sign, 3, axis_name="x",
                               inner_learning_rate=lr)
  _, state = run_vmap(opt, 9, _f64(PARAMS0), _f64(_targets()))
  chex.assert_trees_all_close(_anchor0(state), _manual_averaging(lr, 3, 3),
                              rtol=1e-12, atol=1e-13)


def test_no_sign_equal_betas_is_slowmo(x64):
  lr, beta, eta = 0.05, 0.3, 0.8
  no_sign = optax.chain(_sign.scale_by_lion_momentum(beta, beta, jnp.float64),
                        optax.scale_by_learning_rate(eta))
  slow = optax.sgd(eta * (1 - beta), momentum=beta)
  runs = [run_vmap(optax_sign.local_steps(optax.sgd(lr), outer, 3, "x",
                                          inner_learning_rate=lr),
                   9, _f64(PARAMS0), _f64(_targets()))[1]
          for outer in (no_sign, slow)]
  chex.assert_trees_all_close(_anchor0(runs[0]), _anchor0(runs[1]),
                              rtol=1e-12, atol=1e-13)


def test_diloco_map(x64):
  """Lion without sign, b1 = mu^2, b2 = mu, eta = alpha/(1-mu), equals DiLoCo;
  and DiLoCo's optax.sgd(nesterov) follows the DiLoCo formula."""
  lr, alpha, mu = 0.05, 0.7, 0.9
  no_sign = optax.chain(_sign.scale_by_lion_momentum(mu**2, mu, jnp.float64),
                        optax.scale_by_learning_rate(alpha / (1 - mu)))
  diloco = optax_sign.diloco(lr, inner=optax.sgd(lr), sync_every=3,
                             axis_name="x")
  mapped = optax_sign.local_steps(optax.sgd(lr), no_sign, 3, "x",
                                  pseudo_grad_scale="none")
  runs = [run_vmap(o, 9, _f64(PARAMS0), _f64(_targets()))[1]
          for o in (mapped, diloco)]
  chex.assert_trees_all_close(_anchor0(runs[0]), _anchor0(runs[1]),
                              rtol=1e-12, atol=1e-13)
  # The DiLoCo formula by hand: b <- mu b + D; x <- x - alpha (D + mu b).
  targets = _f64(_targets())
  anchor, b = _f64(PARAMS0), jax.tree.map(jnp.zeros_like, _f64(PARAMS0))
  for _ in range(3):
    local = _stack(anchor)
    for _ in range(3):
      grads = jax.vmap(jax.grad(_loss))(local, targets)
      local = jax.tree.map(lambda p, g: p - lr * g, local, grads)
    delta = jax.tree.map(lambda a, x: a - jnp.mean(x, 0), anchor, local)
    b = jax.tree.map(lambda b, d: mu * b + d, b, delta)
    anchor = jax.tree.map(lambda a, d, b: a - alpha * (d + mu * b),
                          anchor, delta, b)
  chex.assert_trees_all_close(_anchor0(runs[1]), anchor, rtol=1e-12,
                              atol=1e-13)


@pytest.mark.parametrize("scale", ["none", "inner_lr"])
def test_outer_sgd_lr1_is_averaging_and_tau1_is_sgd(x64, scale):
  lr = 0.05
  opt = optax_sign.local_steps(optax.sgd(lr), optax.sgd(1.0), 3, "x", scale,
                               inner_learning_rate=lr)
  _, state = run_vmap(opt, 9, _f64(PARAMS0), _f64(_targets()))
  chex.assert_trees_all_close(_anchor0(state), _manual_averaging(lr, 3, 3),
                              rtol=1e-12, atol=1e-13)
  opt = optax_sign.local_steps(optax.sgd(lr), optax.sgd(1.0), 1, "x", scale,
                               inner_learning_rate=lr)
  _, state = run_vmap(opt, 7, _f64(PARAMS0), _f64(_targets()))
  chex.assert_trees_all_close(_anchor0(state),
                              _averaged_grad_run(optax.sgd(lr), 7),
                              rtol=1e-12, atol=1e-13)


# ------------------------------------------------ placements and the HLO


def test_shard_map_pmap_bitwise_and_vmap_equal():
  opt = _dsm(3, 0.05)
  sm_params, sm_state = run_shard_map(opt, 12)
  pm_params, pm_state = run_pmap(opt, 12)
  vm_params, vm_state = run_vmap(opt, 12)
  for w in range(N):
    _assert_bitwise(sm_state.anchor,
                    jax.tree.map(lambda x: x[w], pm_state.anchor))
  _assert_bitwise(sm_params, pm_params)
  # vmap sums in another order: anchors may differ only where a sign flipped
  # on a pre-sign value within rounding of zero; here none does.
  for w in range(N):
    _assert_bitwise(sm_state.anchor,
                    jax.tree.map(lambda x: x[w], vm_state.anchor))
  # A hand-written loop over workers (explicit mean) gives the same anchor.
  targets = _targets()
  anchor = PARAMS0
  inner_states = [optax.adam(0.05).init(PARAMS0) for _ in range(N)]
  outer = optax_sign.global_sign_momentum(1.0, 0.95, 0.98, 0.1)
  outer_state = outer.init(PARAMS0)
  for _ in range(4):
    local = []
    for w in range(N):
      p = anchor
      for _ in range(3):
        g = jax.grad(_loss)(p, jax.tree.map(lambda x: x[w], targets))
        u, inner_states[w] = optax.adam(0.05).update(g, inner_states[w], p)
        p = optax.apply_updates(p, u)
      local.append(p)
    mean = jax.tree.map(lambda *xs: sum(xs) / N, *local)
    pg = jax.tree.map(lambda a, m: (a - m) / 0.05, anchor, mean)
    step, outer_state = outer.update(pg, outer_state, anchor)
    anchor = jax.tree.map(lambda a, s: a + 0.05 * s, anchor, step)
  chex.assert_trees_all_close(sm_state.anchor, anchor, rtol=0, atol=1e-6)


def _hlo_computations(text):
  """Maps each HLO computation name to its body text."""
  comps, name, body = {}, None, []
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" "):
      name, body = header.group(1), []
      if line.startswith("ENTRY"):
        comps["__entry__"] = name
    elif line.startswith("}") and name is not None:
      comps[name] = "\n".join(body)
      name = None
    elif name is not None:
      body.append(line)
  return comps


def _callees(body):
  names = re.findall(r"(?:calls|to_apply|body|condition|true_computation|"
                     r"false_computation)=%?([\w.\-]+)", body)
  for group in re.findall(r"branch_computations=\{([^}]*)\}", body):
    names += [n.strip().lstrip("%") for n in group.split(",")]
  return names


def _sync_loop_body(text):
  """The body computation of the program's one while loop (the sync step)."""
  loops = re.findall(r" while\(.*body=%?([\w.\-]+)", text)
  assert len(loops) == 1, loops
  return loops[0]


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter",
                "collective-permute", "all-to-all")


def _reachable(comps, root, skip=()):
  seen, todo = set(), [root]
  while todo:
    c = todo.pop()
    if c in seen or c in skip or c not in comps:
      continue
    seen.add(c)
    todo += _callees(comps[c])
  return seen


def _allreduce_bytes(body):
  total = 0
  for m in re.finditer(r"= (\(?[^=]*?\)?) all-reduce(?:-start)?\(", body):
    for dtype, dims in re.findall(r"(f32|bf16|f16|s32|s8|u8|pred)\[([\d,]*)\]",
                                  m.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
      total += size * {"f32": 4, "s32": 4, "bf16": 2, "f16": 2}.get(dtype, 1)
  return total


def test_hlo_collectives_only_in_sync_loop_one_fp32_allreduce():
  opt = _dsm(3, 0.05)
  fn = _shard_map_fn(opt, 1, _mesh())
  text = fn.lower(*_shard_map_args(opt)).compile().as_text()
  comps = _hlo_computations(text)
  entry = comps["__entry__"]
  body = _sync_loop_body(text)
  assert "conditional(" not in text
  for c in _reachable(comps, entry, skip={body}):
    assert not any(op + "(" in comps[c] or op + "-start(" in comps[c]
                   for op in _COLLECTIVES), (c, comps[c])
  sync = _reachable(comps, body)
  sync_text = "\n".join(comps[c] for c in sync)
  assert _allreduce_bytes(sync_text) == 4 * NUM_PARAMS
  for op in _COLLECTIVES[1:]:
    assert op + "(" not in sync_text


def test_gradient_trap_is_avoided_and_shard_map_grads_are_local():
  """A replicated-params shard_map gradient would all-reduce every step; the
  per-worker spec used here keeps the non-sync step free of collectives, and
  the local models really differ between workers mid-round."""
  opt = _dsm(3, 0.05)
  params, state = run_shard_map(opt, 2)
  assert not np.array_equal(params["w"][0], params["w"][1])
  # Equal to the vmap run (where gradients are per worker by construction),
  # up to float32 rounding of separately compiled Adam steps.
  vm_params, _ = run_vmap(opt, 2)
  chex.assert_trees_all_close(params, vm_params, rtol=1e-5, atol=1e-7)


def test_broadcast_params_equalizes_workers_and_first_sync_equalizes():
  keys = jax.random.split(jax.random.key(3), N)
  init = lambda k: jax.tree.map(lambda x: x + 0.1 * jax.random.normal(
      k, x.shape), PARAMS0)
  different = jax.vmap(init)(keys)
  same = jax.vmap(lambda p: optax_sign.broadcast_params(p, "x"),
                  axis_name="x")(different)
  for w in range(N):
    _assert_bitwise(jax.tree.map(lambda x: x[w], same),
                    jax.tree.map(lambda x: x[0], different))
  # shard_map: one all-reduce of the parameters' bytes.
  fn = jax.jit(jax.shard_map(
      lambda p: optax_sign.broadcast_params(p, "x"), mesh=_mesh(),
      in_specs=P("x"), out_specs=P("x")))
  text = fn.lower(different).compile().as_text()
  assert _allreduce_bytes(text) == 4 * NUM_PARAMS  # per device program
  _assert_bitwise(fn(different), jax.tree.map(
      lambda x: jnp.broadcast_to(x[:1], x.shape), different))
  # Local models start different, the state from worker 0: the first sync
  # moves every worker onto the common anchor.
  opt = _dsm(3, 0.05)
  params, state = jax.jit(jax.vmap(_worker_loop(opt, 3), axis_name="x"))(
      different, _stack(opt.init(jax.tree.map(lambda x: x[0], different))),
      _targets())
  anchor = jax.tree.map(lambda x: x[0], state.anchor)
  for w in range(N):
    _assert_bitwise(jax.tree.map(lambda x: x[w], state.anchor), anchor)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[w], params), anchor,
                                rtol=0, atol=1e-7)


# ------------------------------------------------------------- checkpoint


def test_orbax_checkpoint_mid_round_continues_bitwise(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  opt = _dsm(3, 0.05)
  targets = _targets()
  loop4 = jax.jit(jax.vmap(_worker_loop(opt, 4), axis_name="x"))
  loop5 = jax.jit(jax.vmap(_worker_loop(opt, 5), axis_name="x"))
  params, state = loop4(_stack(PARAMS0), _stack(opt.init(PARAMS0)), targets)
  assert int(state.count[0]) % 3 != 0  # mid-round
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "ckpt", {"params": params, "state": state})
  ckptr.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                        {"params": params, "state": state})
  restored = ckptr.restore(tmp_path / "ckpt", target)
  assert isinstance(restored["state"], optax_sign.LocalStepsState)
  resumed = loop5(restored["params"], restored["state"], targets)
  straight = loop5(params, state, targets)
  _assert_bitwise(resumed, straight)


def _vmap_problem(workers=4):
  xs = jax.random.normal(jax.random.key(0), (workers, 32, 8))
  return xs, xs @ jnp.arange(8.0)


def _vmap_loss(params, x, y):
  return jnp.mean((x @ params["w"] - y) ** 2)


def _vmap_step(tx):
  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(_vmap_loss)(params, x, y), state,
                               params)
    return optax.apply_updates(params, updates), state
  return step


def test_vmap_state_and_batched_counter_give_the_same_bits():
  """local_steps_vmap_state keeps the sync loop's predicate a scalar; a
  batched counter batches it (the loop runs while any worker syncs, and all
  sync together); both give the same bits."""
  tx = optax_sign.dsm_ls(0.05, sync_every=4, axis_name="w", learning_rate=2.0)
  xs, ys = _vmap_problem()
  params = {"w": jnp.zeros((4, 8))}
  state, axes = optax_sign.local_steps_vmap_state(
      tx.init({"w": jnp.zeros(8)}), 4)
  assert state.count.shape == () and state.anchor["w"].shape == (8,)
  step = jax.jit(jax.vmap(_vmap_step(tx), in_axes=(0, axes, 0, 0),
                          out_axes=(0, axes), axis_name="w"))
  batched_step = jax.jit(jax.vmap(_vmap_step(tx), axis_name="w"))
  preds = [re.findall(r"= \((pred\[\d*\])[^=]* while\(", f.lower(
      p, st, xs, ys).compile().as_text()) for f, p, st in (
          (step, params, state),
          (batched_step, params, jax.vmap(tx.init)(params)))]
  assert preds == [["pred[]"], ["pred[4]"]], preds
  p1, s1, p2, s2 = params, state, params, jax.vmap(tx.init)(params)
  for _ in range(10):
    p1, s1 = step(p1, s1, xs, ys)
    p2, s2 = batched_step(p2, s2, xs, ys)
  # The same steps; the fusions differ, so the float32 mean may round apart.
  np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s1.anchor["w"], s2.anchor["w"][0], rtol=1e-6,
                             atol=1e-7)


def _replica_collectives(comps, roots, mesh, skip=()):
  text = "\n".join(comps[c] for root in roots
                   for c in _reachable(comps, root, skip=skip))
  report = optax_sign._wire.parse_collectives(text, mesh=mesh)
  return [(c.op, c.dtype, c.axes) for c in report.collectives
          if "replica" in c.axes]


@pytest.mark.parametrize("batched_counter", [False, True])
def test_spmd_vmap_on_replica_mesh_one_allreduce_over_replica_in_loop(
    batched_counter):
  """MaxText layout: replicas stacked on a leading axis sharded over
  "replica", each replica's params sharded over "fsdp". The parameter
  all-reduce runs inside the sync loop only, also with a batched counter
  (whose loop condition all-reduces one flag per replica)."""
  mesh = jax.make_mesh((4, 2), ("replica", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  tx = optax_sign.dsm_ls(0.05, sync_every=4, axis_name="replica")
  xs, ys = _vmap_problem()
  shard = lambda x, spec: jax.device_put(
      x, jax.sharding.NamedSharding(mesh, spec))
  params = {"w": shard(jnp.zeros((4, 8)), P("replica", "fsdp"))}
  state, axes = optax_sign.local_steps_vmap_state(
      tx.init({"w": jnp.zeros(8)}), 4)
  state = state._replace(
      anchor={"w": shard(state.anchor["w"], P("fsdp"))},
      inner_state=jax.tree.map(lambda x: shard(x, P("replica")),
                               state.inner_state))
  if batched_counter:
    state = jax.vmap(tx.init)(params)
    axes = 0
  step = jax.jit(jax.vmap(_vmap_step(tx), in_axes=(0, axes, 0, 0),
                          out_axes=(0, axes), axis_name="replica",
                          spmd_axis_name="replica"))
  args = (params, state, shard(xs, P("replica")), shard(ys, P("replica")))
  text = step.lower(*args).compile().as_text()
  comps = _hlo_computations(text)
  body = _sync_loop_body(text)
  assert _replica_collectives(comps, [body], mesh) == [
      ("all-reduce", "f32", ("replica",))]
  outside = _replica_collectives(comps, [comps["__entry__"]], mesh,
                                 skip={body})
  assert outside == ([("all-reduce", "pred", ("replica",))]
                     if batched_counter else []), outside
  for _ in range(8):
    params, state = jax.block_until_ready(step(params, state, *args[2:]))
  anchor = optax_sign.local_steps_anchor(state)
  if batched_counter:  # every replica holds the same anchor
    np.testing.assert_array_equal(anchor["w"], anchor["w"][:1].repeat(4, 0))
    anchor = {"w": anchor["w"][0]}
  assert float(_vmap_loss(anchor, xs[0], ys[0])) < float(
      _vmap_loss({"w": jnp.zeros(8)}, xs[0], ys[0]))


def test_unbound_axis_name_is_a_clear_error():
  tx = optax_sign.dsm_ls(0.05, sync_every=4, axis_name="workers")
  params = {"w": jnp.zeros(8)}
  with pytest.raises(ValueError, match="axis_name='workers' is not bound"):
    tx.update(params, tx.init(params), params)


def test_vmap_state_rejects_other_states():
  with pytest.raises(TypeError, match="LocalStepsState"):
    optax_sign.local_steps_vmap_state(optax.adam(1e-3).init({}), 4)


def test_shard_map_replica_by_fsdp_equals_vmap_reference():
  """Replicas over "replica", each replica's params sharded over "fsdp"; the
  anchor and outer state sharded like one replica's params (fully manual)."""
  mesh = jax.make_mesh((4, 2), ("replica", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  tx = optax_sign.dsm_ls(0.05, sync_every=4, axis_name="replica")
  xs, ys = _vmap_problem()
  state, axes = optax_sign.local_steps_vmap_state(
      tx.init({"w": jnp.zeros(8)}), 4)
  reference = jax.jit(jax.vmap(_vmap_step(tx), in_axes=(0, axes, 0, 0),
                               out_axes=(0, axes), axis_name="replica"))
  ref_params, ref_state = {"w": jnp.zeros((4, 8))}, state

  def local(params, state, x, y):
    # Each fsdp shard holds half of w: gather it for the loss, keep the
    # update on the shard (the usual FSDP step, written by hand here).
    inner = jax.tree.map(lambda s: s[0], state.inner_state)
    state = state._replace(inner_state=inner)
    w_full = jax.lax.all_gather(params["w"][0], "fsdp", tiled=True)
    grads = jax.grad(_vmap_loss)({"w": w_full}, x[0], y[0])
    index = jax.lax.axis_index("fsdp")
    grads = {"w": jax.lax.dynamic_slice_in_dim(grads["w"], index * 4, 4)}
    updates, state = tx.update(grads, state, {"w": params["w"][0]})
    params = optax.apply_updates({"w": params["w"][0]}, updates)
    inner = jax.tree.map(lambda s: s[None], state.inner_state)
    return jax.tree.map(lambda p: p[None], params), state._replace(
        inner_state=inner)

  inner_specs = jax.tree.map(lambda s: P("replica", *([None] * (s.ndim - 2)),
                                         "fsdp") if s.ndim > 1
                             else P("replica"), state.inner_state)
  state_specs = optax_sign.LocalStepsState(
      count=P(), anchor={"w": P("fsdp")}, inner_state=inner_specs,
      outer_state=jax.tree.map(lambda s: P("fsdp") if s.ndim else P(),
                               state.outer_state))
  step = jax.jit(jax.shard_map(
      local, mesh=mesh,
      in_specs=({"w": P("replica", "fsdp")}, state_specs, P("replica"),
                P("replica")),
      out_specs=({"w": P("replica", "fsdp")}, state_specs)))
  place = lambda tree, specs: jax.device_put(tree, jax.tree.map(
      lambda s: jax.sharding.NamedSharding(mesh, s), specs,
      is_leaf=lambda s: isinstance(s, P)))
  params = place({"w": jnp.zeros((4, 8))}, {"w": P("replica", "fsdp")})
  sharded_state = place(state, state_specs)
  x, y = place(xs, P("replica")), place(ys, P("replica"))
  for _ in range(9):
    params, sharded_state = jax.block_until_ready(
        step(params, sharded_state, x, y))
    ref_params, ref_state = reference(ref_params, ref_state, xs, ys)
  np.testing.assert_allclose(np.asarray(params["w"]), ref_params["w"],
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(sharded_state.anchor["w"]),
                             ref_state.anchor["w"], rtol=1e-6, atol=1e-7)
  assert sharded_state.anchor["w"].sharding.spec == P("fsdp")


@pytest.mark.parametrize("dead", [(2,), (0, 3), (0, 1, 2, 3)])
def test_alive_averages_live_replicas_only(dead):
  """At a sync, dead replicas (here with parameters 1e3) are left out of the
  average; everyone moves to the new anchor (to one float32 rounding of
  params + (anchor - params)); no live replica: no outer step."""
  workers = 4
  alive = np.ones(workers, bool)
  alive[list(dead)] = False
  tx = optax_sign.local_steps(optax.sgd(0.1), optax.sgd(1.0), sync_every=2,
                              axis_name="w", pseudo_grad_scale="none")
  xs, ys = _vmap_problem(workers)
  state, axes = optax_sign.local_steps_vmap_state(
      tx.init({"w": jnp.zeros(8)}), workers)

  def step(params, state, x, y, a):
    updates, state = tx.update(jax.grad(_vmap_loss)(params, x, y), state,
                               params, alive=a)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.vmap(step, in_axes=(0, axes, 0, 0, 0),
                          out_axes=(0, axes), axis_name="w"))
  params = {"w": jnp.zeros((workers, 8))}
  everyone = jnp.ones(workers, bool)
  params, state = step(params, state, xs, ys, everyone)  # a local step
  corrupt = params["w"].at[jnp.asarray(list(dead))].set(1e3)
  local = {"w": corrupt}
  # Expected local models after this step's inner sgd, then their live mean.
  grads = jax.vmap(jax.grad(_vmap_loss))(local, xs, ys)
  local_new = np.asarray(local["w"] - 0.1 * grads["w"])
  expected = (local_new[alive].mean(0) if alive.any()
              else np.asarray(state.anchor["w"]))
  params, state = step(local, state, xs, ys, jnp.asarray(alive))  # a sync
  np.testing.assert_allclose(np.asarray(state.anchor["w"]), expected,
                             rtol=1e-5, atol=1e-6)
  for i in range(workers):  # every replica rejoins at the anchor
    np.testing.assert_allclose(np.asarray(params["w"][i]), expected,
                               rtol=1e-5, atol=1e-3 if i in dead else 1e-6)


def test_sync_chosen_on_the_host_equals_the_counter():
  """Two jitted steps (sync=False / sync=True) picked on the host give the
  counter-driven trajectory, on 4 workers under shard_map (to rounding: the
  programs differ, so XLA may fuse differently)."""
  opt = _dsm(sync_every=3)
  mesh = _mesh()
  spec = _shard_map_specs()

  def make(sync):
    def per_device(params, state, target):
      squeeze = lambda t: jax.tree.map(lambda x: x[0], t)
      expand = lambda t: jax.tree.map(lambda x: x[None], t)
      p, s = squeeze(params), state._replace(
          inner_state=squeeze(state.inner_state))
      grads = jax.grad(_loss)(p, squeeze(target))
      kwargs = {} if sync is None else {"sync": sync}
      updates, s = opt.update(grads, s, p, **kwargs)
      p = optax.apply_updates(p, updates)
      return expand(p), s._replace(inner_state=expand(s.inner_state))
    return jax.jit(jax.shard_map(per_device, mesh=mesh,
                                 in_specs=(P("x"), spec, P("x")),
                                 out_specs=(P("x"), spec)))

  counter, local, sync = make(None), make(False), make(True)
  a = b = _shard_map_args(opt)
  targets = a[2]
  for t in range(8):
    a = counter(*a) + (targets,)
    b = (sync if (t + 1) % 3 == 0 else local)(*b) + (targets,)
    chex.assert_trees_all_close(a[:2], b[:2], rtol=1e-6, atol=1e-7)
  # The host-chosen non-sync step has no conditional and no collective.
  hlo = local.lower(*b).compile().as_text()
  assert "conditional" not in hlo and "all-reduce" not in hlo


def test_sync_must_be_a_python_bool():
  opt = _dsm(sync_every=3)
  params = jax.tree.map(lambda x: x, PARAMS0)
  with pytest.raises(TypeError, match="sync must be True or False"):
    jax.vmap(lambda p, s: opt.update(p, s, p, sync=jnp.bool_(True)),
             axis_name="x")(_stack(params), _stack(opt.init(params)))
