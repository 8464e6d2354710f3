"""Harness cases for the sign operators and the ready sign optimizers."""

import jax
import optax

import harness
import optax_sign

_KEY = jax.random.key(0)


def _chain(transform, learning_rate):
  return optax.chain(transform, optax.scale_by_learning_rate(learning_rate))


CASES = [
    harness.Case("sign_sgd", optax_sign.sign_sgd, {"learning_rate": 0.02}),
    harness.Case("sign_sgd_positive_tie",
                 lambda learning_rate: optax_sign.sign_sgd(learning_rate,
                                                           tie="positive"),
                 {"learning_rate": 0.02}),
    harness.Case("signum", optax_sign.signum,
                 {"learning_rate": 0.02, "beta": 0.9}),
    harness.Case("lion_like", optax_sign.lion_like,
                 {"learning_rate": 0.02, "b1": 0.9, "b2": 0.99,
                  "weight_decay": 1e-3}),
    harness.Case("sign_momentum_chain",
                 lambda learning_rate, b1, b2: _chain(
                     optax_sign.sign_momentum(b1, b2), learning_rate),
                 {"learning_rate": 0.02, "b1": 0.9, "b2": 0.99}),
    harness.Case("sign_sgd_schedule",
                 lambda peak: optax_sign.sign_sgd(
                     optax.cosine_decay_schedule(peak, 300, alpha=0.1)),
                 {"peak": 0.03}),
    harness.Case("randomized_sign",
                 lambda learning_rate, bound: _chain(
                     optax_sign.scale_by_randomized_sign(_KEY, bound),
                     learning_rate),
                 {"learning_rate": 0.01, "bound": 0.5}, steps=400),
    harness.Case("error_feedback_sign",
                 lambda learning_rate: _chain(
                     optax_sign.scale_by_error_feedback_sign(), learning_rate),
                 {"learning_rate": 0.1}),
]


DEFAULTS = [
    harness.Default("sign_sgd", optax_sign.sign_sgd, (0.02,)),
    harness.Default("signum", optax_sign.signum, (0.02,)),
    harness.Default("lion_like", optax_sign.lion_like, (0.02,)),
    harness.Default("scale_by_sign", optax_sign.scale_by_sign),
    harness.Default("scale_by_randomized_sign",
                    optax_sign.scale_by_randomized_sign, (_KEY,)),
    harness.Default("scale_by_lion_momentum", optax_sign.scale_by_lion_momentum),
    harness.Default("sign_momentum", optax_sign.sign_momentum),
    harness.Default("scale_by_error_feedback_sign",
                    optax_sign.scale_by_error_feedback_sign),
]
