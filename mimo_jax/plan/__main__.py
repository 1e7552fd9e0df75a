"""`python -m mimo_jax.plan ...`: see `mimo_jax.plan.cli`."""

import sys

from mimo_jax.plan.cli import main

sys.exit(main())
