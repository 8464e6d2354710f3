"""Harness cases for the local-steps presets (one worker, small sync interval)."""

import jax
import optax

import harness
import optax_sign


def _dsm_ls(inner_learning_rate):
  return optax_sign.dsm_ls(inner_learning_rate,
                           inner=optax.sgd(inner_learning_rate),
                           sync_every=2, weight_decay=0.0)


def _dsm_ls_randomized(inner_learning_rate):
  return optax_sign.dsm_ls(inner_learning_rate,
                           inner=optax.sgd(inner_learning_rate),
                           sync_every=2, weight_decay=0.0,
                           key=jax.random.key(0), bound=0.05)


def _diloco(inner_learning_rate):
  return optax_sign.diloco(inner_learning_rate,
                           inner=optax.sgd(inner_learning_rate), sync_every=3)


def _slowmo(inner_learning_rate):
  return optax_sign.slowmo(inner_learning_rate,
                           inner=optax.sgd(inner_learning_rate), sync_every=3)


def _model_averaging(inner_learning_rate):
  return optax_sign.model_averaging(inner_learning_rate, sync_every=2,
                                    inner_weight_decay=0.0)


CASES = [
    harness.Case("local_steps_dsm_ls", _dsm_ls,
                 {"inner_learning_rate": 0.1}),
    harness.Case("local_steps_dsm_ls_randomized", _dsm_ls_randomized,
                 {"inner_learning_rate": 0.05}),
    harness.Case("local_steps_diloco", _diloco,
                 {"inner_learning_rate": 0.1}),
    harness.Case("local_steps_slowmo", _slowmo,
                 {"inner_learning_rate": 0.1}),
    harness.Case("local_steps_model_averaging", _model_averaging,
                 {"inner_learning_rate": 0.05}),
]


DEFAULTS = [
    harness.Default("dsm_ls", optax_sign.dsm_ls, (0.01,)),
    harness.Default("diloco", optax_sign.diloco, (0.01,)),
    harness.Default("slowmo", optax_sign.slowmo, (0.01,)),
    harness.Default("model_averaging", optax_sign.model_averaging, (0.01,)),
    harness.Default("global_sign_momentum", optax_sign.global_sign_momentum),
    harness.Default("local_steps", optax_sign.local_steps,
                    (optax.sgd(0.01), optax.sgd(1.0)),
                    {"inner_learning_rate": 0.01}),
]
