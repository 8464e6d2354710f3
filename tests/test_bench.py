"""Tests of the benchmark CLI, run in-process at tiny sizes."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_sign.bench import cli
from optax_sign.bench import optimizers as opt_lib
from optax_sign.bench import tasks

from test_data import write_idx

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, tmp_path, *args):
  """Runs the CLI in-process; returns (stdout, results.json as a dict)."""
  out = tmp_path / "out"
  code = cli.main(["--tiny", "--no-progress", "--no-compile-cache", "--out",
                   str(out), *args])
  assert code == 0
  stdout = capsys.readouterr().out
  with open(out / "results.json", encoding="utf-8") as f:
    return stdout, json.load(f), out


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC


def test_logreg_default_data_with_grid(capsys, tmp_path):
  stdout, results, out = run_cli(
      capsys, tmp_path, "--task", "logreg", "-o", "adamw",
      "--grid", "sign_sgd", "--grid-points", "3", "--steps", "6")
  assert "optimizer" in stdout and "final loss" in stdout  # the table header
  assert "adamw" in stdout and "sign_sgd (grid best)" in stdout
  assert "grid sign_sgd" in stdout and "total 3 runs, 18 steps" in stdout
  res = results["results"]["logreg"]
  grid = res["grids"][0]
  assert grid["learning_rates"] == [1e-4, 1e-2, 1.0]
  assert grid["total_steps"] == 18
  finals = [r["loss"][-1] for r in grid["runs"]]
  best = res["rows"][1]["run"]
  assert best["loss"][-1] == min(finals)
  assert best["learning_rate"] == grid["best_learning_rate"]
  assert res["rows"][1]["tuning_runs"] == 3
  adamw = res["rows"][0]["run"]
  assert adamw["steps"][-1] == 6 and adamw["loss"][-1] < adamw["loss"][0]
  assert adamw["seconds"] == sorted(adamw["seconds"])
  assert results["config"]["task"] == ["logreg"]
  assert_png(out / "logreg.png")
  # Held-out metrics: columns, a footer on grid selection, JSON curves.
  assert "test loss" in stdout and "test acc" in stdout
  assert "lowest final training loss" in stdout
  assert "grid sign_sgd: test acc by lr {" in stdout
  assert grid["best_by"] == "final training loss"
  for run in [adamw] + grid["runs"]:
    assert set(run["metrics"]) == {"test_loss", "test_accuracy"}
    for values in run["metrics"].values():
      assert len(values) == len(run["steps"])
    assert all(0.0 <= a <= 1.0 for a in run["metrics"]["test_accuracy"])
  assert res["rows"][1]["final_metrics"] == {
      k: v[-1] for k, v in best["metrics"].items()}
  # Trained for 6 steps, the tuned run beats the majority class on held-out
  # rows it never saw; at the zero initial point it predicts all negative.
  held_y = np.asarray(tasks.make_task("logreg", tiny=True).heldout["y"])
  majority = max(np.mean(held_y > 0), np.mean(held_y < 0))
  assert best["metrics"]["test_accuracy"][0] == pytest.approx(
      np.mean(held_y < 0))
  assert best["metrics"]["test_accuracy"][-1] > majority + 0.1
  assert best["metrics"]["test_loss"][0] == pytest.approx(np.log(2), rel=1e-5)
  assert best["metrics"]["test_loss"][-1] < np.log(2)


def test_logreg_libsvm_file(capsys, tmp_path):
  rng = np.random.default_rng(0)
  lines = []
  for i in range(40):
    label = 1 if i % 2 else 0
    cols = sorted(rng.choice(np.arange(1, 51), 3, replace=False))
    feats = " ".join(f"{c}:{(2 * label - 1) * (1 + rng.random()):.3f}"
                     for c in cols)
    lines.append(f"{label} {feats}")
  path = tmp_path / "data.svm"
  path.write_text("\n".join(lines) + "\n")
  stdout, results, _ = run_cli(capsys, tmp_path, "--task", "logreg",
                               "--data", str(path), "-o", "sign_sgd",
                               "--grid", "--steps", "5")
  assert "LIBSVM" in stdout and "d=50" in stdout
  run = results["results"]["logreg"]["rows"][0]["run"]
  assert run["loss"][0] == pytest.approx(np.log(2), rel=1e-5)
  assert run["loss"][-1] < run["loss"][0]
  assert "n=32 (+8 held out, stratified 20%)" in stdout
  assert run["metrics"]["test_accuracy"][-1] == 1.0  # separable by sign


@pytest.mark.parametrize("test_files", [False, True])
def test_mlp_idx_directory(capsys, tmp_path, test_files):
  rng = np.random.default_rng(1)
  for prefix, n in (("train", 64), ("t10k", 24))[:1 + test_files]:
    labels = rng.integers(0, 3, n).astype(np.uint8)
    images = (rng.random((n, 4, 4)) * 60 + labels[:, None, None] * 60)
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
              images.astype(np.uint8), compress=True)
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels,
              compress=True)
  stdout, results, out = run_cli(
      capsys, tmp_path, "--task", "mlp", "--data", str(tmp_path),
      "-o", "adamw", "--grid", "--steps", "4", "--batch-size", "16")
  assert "classes=3" in stdout and "features=16" in stdout
  assert ("n=64 (+24 held out, t10k files)" if test_files
          else "n=52 (+12 held out, stratified 20%)") in stdout
  run = results["results"]["mlp"]["rows"][0]["run"]
  assert len(run["loss"]) == 5 and all(np.isfinite(run["loss"]))
  assert 0.0 <= run["metrics"]["test_accuracy"][-1] <= 1.0
  assert np.isfinite(run["metrics"]["test_loss"][-1])
  assert_png(out / "mlp.png")


def test_charlm_text_file(capsys, tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
  stdout, results, out = run_cli(capsys, tmp_path, "--task", "charlm",
                                 "--data", str(path), "-o", "sign_sgd",
                                 "--grid", "--steps", "3")
  assert "charlm" in stdout and "sign_sgd" in stdout
  run = results["results"]["charlm"]["rows"][0]["run"]
  assert run["steps"] == [0, 1, 2, 3]
  assert run["loss"][-1] < run["loss"][0]
  assert "val loss" in stdout and "test acc" not in stdout
  assert "1620 chars (+180 held out, the last 10%)" in stdout
  assert list(run["metrics"]) == ["val_loss"]
  assert len(run["metrics"]["val_loss"]) == 4
  assert run["metrics"]["val_loss"][-1] < run["metrics"]["val_loss"][0]
  assert_png(out / "charlm.png")


def test_alias_logs_its_stepsize(capsys, tmp_path):
  _, results, _ = run_cli(capsys, tmp_path, "--task", "logreg", "-o", "alias",
                          "--grid", "--steps", "8")
  run = results["results"]["logreg"]["rows"][0]["run"]
  assert len(run["stepsize"]) == len(run["steps"])
  assert run["stepsize"][-1] > run["stepsize"][1] > 0  # it adapts
  assert run["loss"][-1] < run["loss"][0]


def test_multi_worker_bytes(capsys, tmp_path):
  stdout, results, out = run_cli(capsys, tmp_path, "--task", "logreg",
                                 "--workers", "2", "-o", "dp_sign_sgd",
                                 "--grid", "majority_vote", "--grid-points",
                                 "2", "--steps", "4")
  assert "2 workers" in stdout and "B/param/step" in stdout
  rows = {r["label"]: r["run"] for r in results["results"]["logreg"]["rows"]}
  dense = rows["dp_sign_sgd"]
  # fp32 all-reduce of 31 parameters among 2 workers: 2(N-1)/N * 4 B each
  # (communication_bytes leaves scalar operands out: the bias may not count).
  assert 0.0 <= dense["metrics"]["test_accuracy"][-1] <= 1.0  # held out too
  per_step = dense["bytes_per_step"]
  assert 4 * 30 <= per_step <= 4 * 31
  assert dense["bytes"] == [per_step * s for s in dense["steps"]]
  # The grid of a multi-worker method reuses its sharded step.
  voted = rows["majority_vote (grid best)"]
  assert 0 < voted["bytes_per_step"] < dense["bytes_per_step"]
  assert voted["loss"][-1] < voted["loss"][0]
  assert_png(out / "logreg.png")


def test_local_steps_count_bytes_per_sync(capsys, tmp_path):
  _, results, _ = run_cli(capsys, tmp_path, "--task", "logreg", "--workers",
                          "2", "-o", "dsm_ls", "--steps", "16",
                          "--log-every", "4")
  run = results["results"]["logreg"]["rows"][0]["run"]
  assert run["sync_every"] == opt_lib.LOCAL_SYNC_EVERY == 8
  per_sync = run["bytes_per_step"]
  assert 4 * 30 <= per_sync <= 4 * 31  # one fp32 all-reduce per round
  assert run["bytes"] == [0, 0, per_sync, per_sync, 2 * per_sync]
  assert run["loss"][-1] < run["loss"][0]


@pytest.mark.parametrize("args, message", [
    (["--task", "logreg", "--data", "/no/such/file.svm"], "does not exist"),
    (["--task", "mlp", "--data", "/no/such/dir"], "does not exist"),
    (["-o", "nosuchopt"], "unknown optimizer 'nosuchopt'"),
    (["-o", "dp_adamw"], "multi-worker"),
    (["--workers", "2", "-o", "adamw"], "single-worker"),
    (["--grid", "prodigy"], "parameter-free"),
    (["--task", "logreg", "mlp", "--data", "x"], "one task"),
    (["--workers", "64", "-o", "dp_sgd"], "needs 64 CPU devices"),
])
def test_clear_errors(tmp_path, args, message):
  jax.devices()  # start JAX with the conftest's 8 devices, as in a full run
  with pytest.raises(SystemExit) as info:
    cli.main(["--tiny", "--no-progress", "--out", str(tmp_path), *args])
  assert message in str(info.value.code)
  assert str(info.value.code).startswith("optax-sign-bench: error:")


def test_malformed_libsvm_via_cli(tmp_path):
  path = tmp_path / "bad.svm"
  path.write_text("1 1:0.5\n-1 2:oops\n")
  with pytest.raises(SystemExit) as info:
    cli.main(["--tiny", "--no-progress", "--out", str(tmp_path), "--task",
              "logreg", "--data", str(path), "-o", "sgd", "--grid"])
  assert "line 2" in str(info.value.code)


def test_list(capsys):
  assert cli.main(["--list"]) == 0
  listing = capsys.readouterr().out
  for name in ("alias", "sign_sgd", "adamw", "prodigy", "dog", "mechanize",
               "majority_vote", "dsm_ls"):
    assert f"  {name} " in listing


def _run_without(module, code):
  """Runs ``code`` in a fresh interpreter where ``import module`` fails."""
  script = f"import sys\nsys.modules[{module!r}] = None\n{code}"
  return subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=300, check=False)


@pytest.mark.parametrize("module, package", cli.EXTRA_MODULES.items())
def test_missing_extra_names_it(module, package):
  """Without a package of the bench extra the CLI exits with an install hint
  (before any work), not a ModuleNotFoundError traceback."""
  result = _run_without(module, "from optax_sign.bench import cli\n"
                                "cli.main(['--tiny', '--task', 'logreg'])")
  assert result.returncode == 1, result.stderr
  assert result.stderr.startswith("optax-sign-bench: error:"), result.stderr
  assert f"missing packages of the bench extra: {package};" in result.stderr
  assert 'pip install "optax-sign[bench]"' in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_flax_python_m():
  """``python -m optax_sign.bench`` imports no flax before the check."""
  result = _run_without("flax", "import runpy\n"
                                "sys.argv = ['optax_sign.bench', '--help']\n"
                                "runpy.run_module('optax_sign.bench', "
                                "run_name='__main__')")
  assert result.returncode == 1, result.stderr
  assert "bench extra: flax;" in result.stderr
  assert 'pip install "optax-sign[bench]"' in result.stderr
  assert "Traceback" not in result.stderr


def test_every_entry_builds():
  """Every registry entry constructs, initialises and updates.

  Single-worker entries run with ``axis_name=None``; multi-worker ones inside
  a ``vmap`` over two workers named like the benchmark's axis.
  """
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, -1.0, 0.25])}
  for entry in opt_lib.REGISTRY.values():
    context = opt_lib.Context(
        axis_name=opt_lib.AXIS if entry.multi_worker else None, steps=10)
    tx = opt_lib.build(entry, entry.default_lr, context)

    def step(p, g, tx=tx):
      updates, _ = tx.update(g, tx.init(p), p, value=jnp.sum(p["w"]))
      return updates

    if entry.multi_worker:
      stack = lambda t: jax.tree.map(lambda x: jnp.stack([x, -x]), t)
      updates = jax.vmap(step, axis_name=opt_lib.AXIS)(stack(params),
                                                       stack(grads))
      assert updates["w"].shape == (2, 3), entry.name
    else:
      updates = step(params, grads)
      assert updates["w"].shape == (3,), entry.name
    assert np.all(np.isfinite(updates["w"])), entry.name
  local = {e.name for e in opt_lib.REGISTRY.values() if e.local_steps}
  assert local == {"dsm_ls", "dsm_ls_rand", "diloco", "slowmo", "local_adamw"}


def test_every_single_worker_entry_takes_a_step():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  loss = lambda p: jnp.sum(jnp.square(p["w"]))
  for entry in opt_lib.REGISTRY.values():
    if entry.multi_worker:
      continue
    tx = opt_lib.build(entry, entry.default_lr, opt_lib.Context(steps=10))
    state = tx.init(params)
    p = params
    for _ in range(3):
      value, grads = jax.value_and_grad(loss)(p)
      updates, state = tx.update(grads, state, p, value=value)
      p = optax.apply_updates(p, updates)
    assert float(loss(p)) < float(loss(params)), entry.name


def test_grid_reuses_one_compiled_step():
  entry = opt_lib.lookup("sign_sgd")
  tx = opt_lib.build(entry, 1e-3, opt_lib.Context())
  state = opt_lib.set_learning_rate(tx.init({"w": jnp.ones(2)}), 0.5)
  updates, _ = tx.update({"w": jnp.array([1.0, -1.0])}, state)
  np.testing.assert_allclose(updates["w"], [-0.5, 0.5])
  assert opt_lib.log_grid(1e-4, 1.0, 5) == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
  with pytest.raises(ValueError, match="bad grid"):
    opt_lib.log_grid(1.0, 0.1, 3)


def test_tasks_share_a_functional_interface():
  for name in ("logreg", "mlp"):  # charlm: see test_charlm_text_file
    task = tasks.make_task(name, tiny=True)
    batch = task.sample(task.data, jax.random.key(0))
    value = task.loss(task.params, batch)
    assert value.shape == () and np.isfinite(value)
    assert task.num_params > 0
    metrics = task.eval_metrics(task.params, task.heldout)
    assert set(metrics) == {"test_loss", "test_accuracy"}
    assert 0.0 <= float(metrics["test_accuracy"]) <= 1.0
    assert (task.data["x"].shape[0], task.heldout["x"].shape[0]) == (
        tasks.TINY_ROWS[name])
  with pytest.raises(ValueError, match="unknown task"):
    tasks.make_task("nope")


@pytest.mark.parametrize("name, rows", [("logreg", 569), ("mlp", 1797)])
def test_held_out_rows_are_disjoint(name, rows):
  task = tasks.make_task(name)  # full size (the default data has no twins)
  train, held = (np.asarray(d["x"]) for d in (task.data, task.heldout))
  assert train.shape[0] + held.shape[0] == rows
  classes = len(np.unique(np.asarray(task.data["y"])))
  assert abs(held.shape[0] - tasks.HOLDOUT * rows) <= classes  # per-class
  seen = {r.tobytes() for r in train}
  assert not any(r.tobytes() in seen for r in held)
  # Stratified: the class balance of both sides matches.
  counts = [np.unique(np.asarray(d["y"]), return_counts=True)[1] / len(d["y"])
            for d in (task.data, task.heldout)]
  np.testing.assert_allclose(counts[0], counts[1], atol=0.02)


def test_charlm_holds_out_the_end_of_the_text(tmp_path):
  path = tmp_path / "text.txt"
  text = "".join(chr(ord("a") + i % 26) for i in range(1170)) + "XYZ" * 43 + "X"
  path.write_text(text)
  task = tasks.charlm(str(path), batch_size=4, context=8, width=8, depth=1,
                      heads=1)
  train, held = np.asarray(task.data["ids"]), np.asarray(task.heldout["ids"])
  assert (train.size, held.size) == (1170, 130)
  vocab = sorted(set(text))
  np.testing.assert_array_equal(held, [vocab.index(c) for c in text[1170:]])
  # No training window reaches into the held-out tail (its letters).
  batch = jax.jit(jax.vmap(task.sample, in_axes=(None, 0)))(
      task.data, jax.random.split(jax.random.key(0), 64))
  assert batch.shape[-1] == 9
  assert not np.isin(np.asarray(batch), [vocab.index(c) for c in "XYZ"]).any()
  starts = np.asarray(task.heldout["eval_starts"])
  assert starts.min() == 0 and starts.max() == held.size - 9
  value = jax.jit(task.eval_metrics)(task.params, task.heldout)["val_loss"]
  assert np.isfinite(value)
  with pytest.raises(tasks.data_lib.DataError, match="held out"):
    tasks.charlm(str(path), context=200, holdout=0.1)


@pytest.mark.parametrize("args, message", [
    (["--grid-points", "0"], "--grid-points must be >= 1"),
    (["--grid-range", "0", "1"], "--grid-range needs 0 < LOW <= HIGH"),
    (["--grid-range", "1", "0.1"], "--grid-range needs 0 < LOW <= HIGH"),
    (["-o", "alias", "adamw", "--lr", "alias=0.1"], "parameter-free"),
    (["-o", "adamw", "--lr", "sgd=0.1"], "'sgd' is not among the optimizers"),
    (["-o", "adamw", "--grid", "sign_sgd", "--lr", "sign_sgd=0.1"],
     "'sign_sgd' is not among the optimizers"),
    (["--batch-size", "-1"], "--batch-size must be >= 0"),
    (["--log-every", "-5"], "--log-every must be >= 1"),
])
def test_bad_inputs_fail_before_any_run(capsys, tmp_path, args, message):
  with pytest.raises(SystemExit) as info:
    cli.main(["--tiny", "--no-progress", "--out", str(tmp_path / "out"),
              *args])
  assert str(info.value.code).startswith("optax-sign-bench: error:")
  assert message in str(info.value.code)
  assert "==" not in capsys.readouterr().out  # no task started
  assert not (tmp_path / "out").exists()


def test_lr_override_reaches_the_run(capsys, tmp_path):
  _, results, _ = run_cli(capsys, tmp_path, "--task", "logreg", "-o", "sgd",
                          "--lr", "sgd=0.0123", "--grid", "--steps", "2")
  assert results["config"]["lr"] == {"sgd": 0.0123}
  run = results["results"]["logreg"]["rows"][0]["run"]
  assert run["learning_rate"] == 0.0123


def test_registry_covers_every_optax_sign_optimizer():
  """The issue-6 registry lists each optax_sign optimizer, on the right side."""
  single = {"alias", "alias_sign", "alias_released", "alias_momentum",
            "os_sign_sgd", "os_signum", "os_lion", "ef_sign_sgd"}
  multi = {"majority_vote", "mean_of_signs", "ef_mean_signs", "alias_mv",
           "alias_mv_sign", "alias_mv_rel", "dsm_ls", "dsm_ls_rand"}
  for name in single | multi:
    assert opt_lib.lookup(name).multi_worker == (name in multi), name
  assert opt_lib.lookup("alias_momentum").tunable
  assert not opt_lib.lookup("alias_mv_rel").tunable


def test_alias_released_warmup_follows_the_run_length():
  """alias_released warms up over 10% of Context.steps, so steps matter."""
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, -1.0, 0.25])}
  entry = opt_lib.lookup("alias_released")

  def second_update(steps):
    tx = opt_lib.build(entry, None, opt_lib.Context(steps=steps))
    state = tx.init(params)
    _, state = tx.update(grads, state, params, value=jnp.float32(1.0))
    updates, _ = tx.update(grads, state, params, value=jnp.float32(0.9))
    return np.asarray(updates["w"])

  short, long = second_update(20), second_update(2000)
  assert np.all(np.isfinite(short)) and np.all(np.isfinite(long))
  # Warmup over 2 steps reaches a larger stepsize than over 200 steps.
  assert np.all(np.abs(short) > np.abs(long))


def test_multi_worker_sign_entries_agree_across_workers():
  """mean_of_signs, ef_mean_signs and alias_mv_sign give every worker the
  same update; mean_of_signs is lr times the mean of the workers' signs."""
  grads = {"w": jnp.array([[0.5, -1.0, 0.25], [0.5, 1.0, -0.25],
                           [0.5, 1.0, 0.25]])}
  params = {"w": jnp.zeros((3, 3))}
  context = opt_lib.Context(axis_name=opt_lib.AXIS, steps=10)
  for name in ("mean_of_signs", "ef_mean_signs", "alias_mv_sign"):
    entry = opt_lib.lookup(name)
    tx = opt_lib.build(entry, entry.default_lr, context)

    def step(p, g, tx=tx):
      return tx.update(g, tx.init(p), p, value=jnp.float32(1.0))[0]

    out = np.asarray(
        jax.vmap(step, axis_name=opt_lib.AXIS)(params, grads)["w"])
    np.testing.assert_allclose(out, np.broadcast_to(out[0], out.shape),
                               err_msg=name)
    if name == "mean_of_signs":
      np.testing.assert_allclose(out[0], -0.01 * np.array([1.0, 1 / 3, 1 / 3]),
                                 rtol=1e-6)


def test_help_states_the_real_defaults():
  text = " ".join(cli.parser().format_help().split())
  assert ("default: " + " ".join(opt_lib.DEFAULT_SINGLE) + ";") in text
  assert " ".join(opt_lib.DEFAULT_MULTI) in text
