"""A killed ``jax.distributed`` process: restart from the last checkpoint.

The recipe of ``docs/howto/checkpointing.md`` ("A process dies"), run as a
user would: two processes (2 CPU devices each, 4 workers) train two models
with per-worker state, error feedback across workers (its residuals) and
DSM-LS (local models and inner AdamW state, restored mid-round), and save
everything with Orbax every ``EVERY`` steps. Process 1 dies without warning
before step ``CRASH``; the launcher, like a job supervisor, stops the
survivor and starts both processes again; they restore the latest complete
checkpoint and finish. The result must equal, bit for bit, the same training
run straight through on 4 devices of one process.
"""

import os

import jax
import numpy as np

import distributed_launch

WORKERS = 4
STEPS = 14
EVERY = 4
CRASH = 10  # process 1 dies before this step: mid-round (sync every 3)


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(WORKERS, 16, 6)).astype(np.float32)
  y = x @ np.linspace(-1, 1, 6) + 0.1 * rng.normal(size=(WORKERS, 16))
  return x, y.astype(np.float32)


def _optimizers():
  import optax  # pylint: disable=g-import-not-at-top
  import optax_sign  # pylint: disable=g-import-not-at-top
  return {
      "ef": optax.chain(optax_sign.scale_by_error_feedback_sign(axis_name="x"),
                        optax.scale_by_learning_rate(0.05)),
      "dsm_ls": optax_sign.dsm_ls(0.05, sync_every=3, axis_name="x"),
  }


def _step_fn(mesh):
  """One jitted step of both models; every leaf has a leading worker axis."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  txs = _optimizers()

  def per_device(tree, x, y):  # each worker holds its own copy of each model
    tree = jax.tree.map(lambda a: a[0], tree)
    x, y = x[0], y[0]
    out = {}
    for name, tx in txs.items():
      params, state = tree[name]
      loss = lambda w: jnp.mean((x @ w - y) ** 2)
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      out[name] = (optax.apply_updates(params, updates), state)
    return jax.tree.map(lambda a: a[None], out)

  return jax.jit(jax.shard_map(per_device, mesh=mesh,
                               in_specs=(P("x"), P("x"), P("x")),
                               out_specs=P("x")), donate_argnums=0)


def _initial(mesh):
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  w0 = np.zeros(6, np.float32)
  tree = {name: (w0, tx.init(w0)) for name, tx in _optimizers().items()}
  stack = lambda a: np.broadcast_to(np.asarray(a), (WORKERS,) + np.shape(a))
  return jax.tree.map(lambda a: distributed_launch.global_array(
      stack(a), mesh, P("x")), tree)


def train(mesh, directory=None, crash_at=None):
  """Trains to STEPS; with ``directory``, checkpoints every EVERY steps and
  starts from the latest complete checkpoint found there. Process 1 exits
  abruptly before step ``crash_at``. Returns every addressable worker's final
  weights per model and the step it started from."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step_fn = _step_fn(mesh)
  x, y = (distributed_launch.global_array(a, mesh, P("x")) for a in _problem())
  tree, start = _initial(mesh), 0
  manager = None
  if directory is not None:
    manager = ocp.CheckpointManager(directory, options=(
        ocp.CheckpointManagerOptions(save_interval_steps=EVERY)))
    if manager.latest_step() is not None:
      start = manager.latest_step()
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
      tree = manager.restore(start, args=ocp.args.StandardRestore(target))
  for step in range(start, STEPS):
    if step == crash_at and jax.process_index() == 1:
      os._exit(17)  # no cleanup, no goodbye: a machine failure
    tree = step_fn(tree, x, y)
    if manager is not None:
      manager.save(step + 1, args=ocp.args.StandardSave(tree))
  if manager is not None:
    manager.wait_until_finished()
  weights = {f"{name} worker {shard.index[0].start or 0}": np.asarray(
      shard.data)[0] for name in tree
             for shard in tree[name][0].addressable_shards}
  return dict(weights, start=np.asarray(start))


def _main(mesh):
  directory = os.environ["RECOVERY_DIR"]
  crash = int(os.environ["RECOVERY_CRASH"])
  return train(mesh, directory, crash_at=crash if crash >= 0 else None)


def test_killed_process_restarts_from_checkpoint_bitwise(tmp_path):
  local = jax.make_mesh((WORKERS,), ("x",),
                        axis_types=(jax.sharding.AxisType.Auto,),
                        devices=jax.devices()[:WORKERS])
  expected = train(local)
  del expected["start"]
  env = {"RECOVERY_DIR": str(tmp_path / "checkpoints")}
  codes, logs, ended = distributed_launch.launch(
      __file__, tmp_path, env=dict(env, RECOVERY_CRASH=str(CRASH)),
      check=False)
  assert codes[1] == 17, logs[1][-2000:]
  assert codes[0] != 0  # the survivor failed or was stopped, never finished
  assert ended < 15
  saved = sorted(int(p) for p in os.listdir(env["RECOVERY_DIR"])
                 if p.isdigit())
  assert saved and max(saved) <= CRASH and max(saved) % 3 != 0  # mid-round
  got = {}
  for process in distributed_launch.launch(
      __file__, tmp_path, env=dict(env, RECOVERY_CRASH="-1")):
    assert int(process.pop("start")) == max(saved)  # resumed, not restarted
    got.update(process)
  assert sorted(got) == sorted(expected)  # every worker's local model
  for name, w in expected.items():
    np.testing.assert_array_equal(got[name], w, err_msg=name)
  assert not np.array_equal(expected["ef worker 0"], np.zeros(6))
  # Mid-round (STEPS is not a multiple of 3): the local models differ.
  assert not np.array_equal(expected["dsm_ls worker 0"],
                            expected["dsm_ls worker 1"])


if __name__ == "__main__":
  distributed_launch.worker_main(_main, heartbeat_timeout=10)
