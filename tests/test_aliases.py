"""Construction-time validation of the local-steps presets in _aliases.py."""

import jax
import optax
import pytest

import optax_sign

PRESETS = (optax_sign.dsm_ls, optax_sign.diloco, optax_sign.slowmo,
           optax_sign.model_averaging)


@pytest.mark.parametrize("make, kwargs, name", [
    (optax_sign.diloco, {"momentum": 1.0}, "momentum"),
    (optax_sign.diloco, {"momentum": -0.1}, "momentum"),
    (optax_sign.diloco, {"learning_rate": -0.7}, "learning_rate"),
    (optax_sign.diloco, {"inner_weight_decay": -0.1}, "inner_weight_decay"),
    (optax_sign.slowmo, {"learning_rate": -1.0}, "learning_rate"),
    (optax_sign.slowmo, {"weight_decay": -0.1}, "weight_decay"),
    (optax_sign.slowmo, {"inner_weight_decay": -0.1}, "inner_weight_decay"),
    (optax_sign.model_averaging, {"inner_weight_decay": -0.1},
     "inner_weight_decay"),
    (optax_sign.dsm_ls, {"learning_rate": -1.0}, "learning_rate"),
    (optax_sign.dsm_ls, {"weight_decay": -0.1}, "weight_decay"),
    (optax_sign.dsm_ls, {"b2": 1.5}, "b2"),
])
def test_bad_hyperparameter_raises_naming_it(make, kwargs, name):
  with pytest.raises(ValueError, match=name):
    make(0.1, **kwargs)


@pytest.mark.parametrize("make", PRESETS)
def test_negative_inner_learning_rate_raises(make):
  with pytest.raises(ValueError, match="inner_learning_rate"):
    make(-0.1)


@pytest.mark.parametrize("make", PRESETS)
@pytest.mark.parametrize("sync_every", [0, 2.5])
def test_bad_sync_every_raises(make, sync_every):
  with pytest.raises(ValueError, match="sync_every"):
    make(0.1, sync_every=sync_every)


def test_dsm_ls_checks_sync_every_before_the_randomized_sign_bound():
  # bound defaults to sync_every: the error must name the argument passed.
  with pytest.raises(ValueError, match="sync_every"):
    optax_sign.dsm_ls(0.1, sync_every=0, key=jax.random.key(0))


def test_diloco_momentum_just_below_one_and_schedules_are_accepted():
  schedule = optax.constant_schedule(0.1)
  optax_sign.diloco(schedule, momentum=0.99, learning_rate=schedule)
  optax_sign.slowmo(schedule, learning_rate=schedule, momentum=1.0,
                    weight_decay=0.0)
  optax_sign.model_averaging(schedule, inner_weight_decay=0.0)
