"""Tests of the local-steps benchmark, run in-process at tiny size."""

import json

import chex
import jax
import numpy as np
import optax
import pytest

import optax_sign
from optax_sign.bench import local_steps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tiny_run_writes_json_png_and_table(capsys, tmp_path):
  out = tmp_path / "out"
  results = local_steps.main([
      "--tiny", "--no-progress", "--out", str(out), "--methods", "adamw",
      "dsm_ls", "averaging", "--dsm-ls-eta", "1", "6", "--dsm-ls-betas",
      "0.95,0.98"])
  stdout = capsys.readouterr().out
  assert "val loss" in stdout and "vs AdamW" in stdout and "all-reduces" in stdout
  assert "sync AdamW" in stdout and "DSM-LS" in stdout and "averaging" in stdout
  with open(out / "local_steps.json", encoding="utf-8") as f:
    payload = json.load(f)
  runs = payload["results"]["runs"]
  assert [r["method"] for r in runs] == ["adamw", "dsm_ls", "dsm_ls",
                                         "averaging"]
  assert results["runs"][1]["hparams"] == {"eta": 1.0, "b1": 0.95, "b2": 0.98}
  config = payload["config"]
  assert "held out" in config["task"]  # the validation text is never trained on
  assert config["steps"] == 8 and config["tau"] == 4 and config["workers"] == 2
  # AdamW all-reduces every step, local methods once per round.
  assert runs[0]["total_allreduces"] == 8
  assert all(r["total_allreduces"] == 2 for r in runs[1:])
  assert runs[1]["allreduces"] == [0, 1, 2] and runs[1]["steps"] == [0, 4, 8]
  for r in runs:
    assert r["val_loss"][0] == runs[0]["val_loss"][0]  # same initial model
    assert np.isfinite(r["final_val_loss"])
    assert r["final_val_loss"] < r["val_loss"][0]  # every method learns
  # The two DSM-LS global learning rates give different models.
  assert runs[1]["final_val_loss"] != runs[2]["final_val_loss"]
  assert payload["results"]["sync_adamw_val_loss"] == runs[0]["final_val_loss"]
  pct = 100 * (runs[3]["final_val_loss"] / runs[0]["final_val_loss"] - 1)
  assert f"{pct:+.1f}%" in stdout
  with open(out / "local_steps.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC


def test_sweeps_give_each_outer_method_its_grid():
  args = local_steps.parser().parse_args([
      "--dsm-ls-eta", "1", "12", "--dsm-ls-betas", "0.95,0.98", "0.9,0.95",
      "--diloco-lr", "0.7", "1", "--diloco-momentum", "0.9", "0.5",
      "--slowmo-lr", "1", "--slowmo-momentum", "0.2",
      "--dsm-ls-inner-decay", "0", "0.1"])
  configs = local_steps.configs(args)
  count = lambda m: sum(c.method == m for c in configs)
  assert [count(m) for m in local_steps.METHODS] == [1, 8, 4, 1, 1]
  assert local_steps.Config("dsm_ls", (("b1", 0.9), ("b2", 0.95), (
      "eta", 12.0))) in configs
  assert local_steps.Config("dsm_ls", (("b1", 0.9), ("b2", 0.95), (
      "eta", 12.0), ("inner_wd", 0.1))) in configs
  # By default every outer optimizer gets the same number of configurations.
  defaults = local_steps.configs(local_steps.parser().parse_args([]))
  assert [sum(c.method == m for c in defaults)
          for m in local_steps.METHODS] == [1, 4, 4, 4, 1]


def _one_dsm_ls_round(hparams):
  """(local params, anchor) of one worker after one round of tau=2."""
  schedule = lambda count: 0.1 * (count + 1)  # gamma at the sync step 1: 0.2
  tx = local_steps.build(local_steps.Config("dsm_ls", hparams), schedule, tau=2)
  params = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
  grads = jax.tree.map(lambda p: np.full_like(p, 3.0), params)

  def two_steps(params):  # one worker, one round (axis "workers" is named)
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, optax_sign.local_steps_anchor(state)

  return jax.vmap(two_steps, axis_name="workers")(
      jax.tree.map(lambda x: x[None], params))


def test_dsm_ls_wiring_uses_the_inner_schedule_and_decays_once():
  params, anchor = _one_dsm_ls_round(
      (("b1", 0.0), ("b2", 0.0), ("eta", 2.0)))
  # The anchor moves by eta*gamma_1*(sign + 0.1 x) on matrices and by
  # eta*gamma_1*sign on biases: gamma is the inner schedule at the global
  # step count of the sync, and the inner AdamW does not decay.
  np.testing.assert_allclose(anchor["w"][0], 1 - 2 * 0.2 * 1.1, rtol=1e-6)
  np.testing.assert_allclose(anchor["b"][0], 1 - 2 * 0.2, rtol=1e-6)
  chex.assert_trees_all_close(params, anchor, rtol=1e-6)


def test_dsm_ls_released_decay_configuration_decays_every_leaf():
  _, anchor = _one_dsm_ls_round(
      (("b1", 0.0), ("b2", 0.0), ("eta", 2.0), ("inner_wd", 0.1)))
  # With inner decay the outer decay has no mask: biases decay too.
  np.testing.assert_allclose(anchor["w"][0], 1 - 2 * 0.2 * 1.1, rtol=1e-6)
  np.testing.assert_allclose(anchor["b"][0], 1 - 2 * 0.2 * 1.1, rtol=1e-6)


def test_steps_must_end_on_a_sync():
  with pytest.raises(SystemExit, match="multiple of --tau"):
    local_steps.main(["--tiny", "--steps", "6", "--tau", "4"])


def test_seeds_are_summarized_as_mean_and_std(capsys, tmp_path):
  results = local_steps.main([
      "--tiny", "--no-progress", "--out", str(tmp_path), "--methods", "adamw",
      "averaging", "--adamw-lr", "3e-3", "1e-2", "--seeds", "0", "1"])
  stdout = capsys.readouterr().out
  runs, summary = results["runs"], results["summary"]
  assert [(r["method"], r["seed"]) for r in runs] == [
      ("adamw", 0), ("adamw", 0), ("averaging", 0),
      ("adamw", 1), ("adamw", 1), ("averaging", 1)]
  # Different seeds: different initial models and data, so different losses.
  assert runs[0]["val_loss"][0] != runs[3]["val_loss"][0]
  assert runs[0]["final_val_loss"] != runs[3]["final_val_loss"]
  # The AdamW learning rate sweep reaches the runs.
  assert [r["hparams"] for r in runs[:2]] == [{"lr": 3e-3}, {"lr": 1e-2}]
  assert runs[0]["final_val_loss"] != runs[1]["final_val_loss"]
  assert [s["settings"] for s in summary] == ["lr=0.003", "lr=0.01", "-"]
  for entry, (a, b) in zip(summary, [(0, 3), (1, 4), (2, 5)]):
    finals = [runs[a]["final_val_loss"], runs[b]["final_val_loss"]]
    assert entry["seeds"] == [0, 1]
    np.testing.assert_allclose(entry["final_val_loss"], np.mean(finals))
    np.testing.assert_allclose(entry["final_val_loss_std"],
                               np.std(finals, ddof=1))
    np.testing.assert_allclose(
        entry["val_loss"],
        np.mean([runs[a]["val_loss"], runs[b]["val_loss"]], axis=0))
  # The reference is the best synchronous AdamW configuration's mean.
  assert results["sync_adamw_val_loss"] == min(
      s["final_val_loss"] for s in summary[:2])
  assert "std" in stdout and "mean over 2 seeds" in stdout
