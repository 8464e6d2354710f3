"""Harness cases for the ALIAS stepsizes (no learning rate to choose).

The cases start from ``initial_stepsize=1e-2``: with the default 1e-6 the first
smoothness sample divides a float32 gradient difference of relative size 1e-6
by 1e-6, so it carries ~10% rounding noise, and jit / no-jit (differently fused
gradients) then disagree by more than the harness's 1e-5 tolerance. The
released preset runs without warmup here: its warmup ramp starts at 0, so the
first step does not move (the MultiSteps check wants a move on it).
"""

import optax

import harness
import optax_sign

CASES = [
    harness.Case("alias_gap_full",
                 lambda d0, eta0: optax_sign.scale_by_alias(
                     "gap", d0=d0, eta0=eta0, initial_stepsize=1e-2),
                 {"d0": 1e-3, "eta0": 0.0}),
    harness.Case("alias_lower_bound_full",
                 lambda f_lower: optax_sign.scale_by_alias(
                     "lower_bound", f_lower=f_lower, initial_stepsize=1e-2),
                 {"f_lower": 0.0}),
    harness.Case("alias_gap_sign_memory",
                 lambda d0: optax_sign.scale_by_alias(
                     "gap", d0=d0, memory="sign", tie="positive",
                     initial_stepsize=1e-2),
                 {"d0": 1e-3}),
    harness.Case("alias_lower_bound_sign_memory",
                 lambda f_lower: optax_sign.scale_by_alias(
                     "lower_bound", f_lower=f_lower, memory="sign",
                     initial_stepsize=1e-2),
                 {"f_lower": 0.0}),
    harness.Case("alias_sign_sgd",
                 lambda d0: optax_sign.alias_sign_sgd(
                     d0=d0, initial_stepsize=1e-2),
                 {"d0": 1e-3}),
    harness.Case("alias_sign_sgd_gap_decay_momentum",
                 lambda max_stepsize: optax_sign.alias_sign_sgd(
                     "lower_bound", max_stepsize=max_stepsize, update_gap=3,
                     warmup_steps=5, warmup_stepsize=0.01, weight_decay=1e-3,
                     momentum=0.5),
                 {"max_stepsize": 0.1}),
    harness.Case("alias_sign_sgd_released",
                 lambda max_stepsize: optax.chain(
                     optax.clip_by_global_norm(1.0),
                     optax_sign.alias_sign_sgd_released(
                         300, max_stepsize=max_stepsize, eta0=1.0,
                         warmup_fraction=0.0)),
                 {"max_stepsize": 0.02}),
    harness.Case("alias_sign_sgd_stochastic",
                 lambda max_stepsize: optax_sign.alias_sign_sgd_stochastic(
                     max_stepsize=max_stepsize, update_gap=3,
                     initial_stepsize=1e-2),
                 {"max_stepsize": 0.1}),
    harness.Case("alias_sign_sgd_learning_rate",
                 lambda learning_rate: optax_sign.alias_sign_sgd(
                     learning_rate=learning_rate, initial_stepsize=1e-2),
                 {"learning_rate": 0.5}),
    harness.Case("alias_momentum",
                 lambda learning_rate, d0: optax_sign.scale_by_alias_momentum(
                     learning_rate, d0=d0),
                 {"learning_rate": 0.02, "d0": 1.0}),
]


# Option I's first curvature sample is a difference of two gradients 1e-6
# apart: XLA fuses the harness's gradient into the statistics and contracts
# it into FMAs as each compilation sees fit (jit or not, hyperparameters
# injected or constant), which moves that sample by ~2e-4 (float32 rounding of
# a cancellation); the iterates then agree to ~3e-5, and so do the last
# gradients (small near the optimum) stored in the state.
DEFAULTS = [
    harness.Default("alias_sign_sgd", optax_sign.alias_sign_sgd,
                    rounding_tol=(1e-3, 1e-4)),
    harness.Default("alias_sign_sgd_released",
                    optax_sign.alias_sign_sgd_released, (40,)),
    harness.Default("alias_sign_sgd_stochastic",
                    optax_sign.alias_sign_sgd_stochastic,
                    rounding_tol=(1e-3, 1e-4)),
    harness.Default("scale_by_alias", optax_sign.scale_by_alias,
                    rounding_tol=(1e-3, 1e-4)),
    harness.Default("scale_by_alias_momentum",
                    optax_sign.scale_by_alias_momentum),
]
