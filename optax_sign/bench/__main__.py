"""``python -m optax_sign.bench``: see :mod:`optax_sign.bench.cli`."""

import sys

from optax_sign.bench.cli import main

sys.exit(main())
