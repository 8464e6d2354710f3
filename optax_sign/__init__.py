"""optax_sign: composable optax transformations for sign-based training."""

from optax_sign._aliases import lion_like
from optax_sign._aliases import sign_sgd
from optax_sign._aliases import signum
from optax_sign._checks import TIE_POLICIES
from optax_sign._error_feedback import ErrorFeedbackState
from optax_sign._error_feedback import scale_by_error_feedback_sign
from optax_sign._sign import randomized_sign
from optax_sign._sign import RandomizedSignState
from optax_sign._sign import scale_by_randomized_sign
from optax_sign._sign import scale_by_sign
from optax_sign._sign import sign_momentum
from optax_sign._sign import LionMomentumState
from optax_sign._sign import scale_by_lion_momentum
from optax_sign._sign import tie_sign

__version__ = "0.1.0"

__all__ = (
    "ErrorFeedbackState",
    "RandomizedSignState",
    "LionMomentumState",
    "TIE_POLICIES",
    "lion_like",
    "randomized_sign",
    "scale_by_error_feedback_sign",
    "scale_by_lion_momentum",
    "scale_by_randomized_sign",
    "scale_by_sign",
    "sign_momentum",
    "sign_sgd",
    "signum",
    "tie_sign",
)
