"""Train MiMo-V2-Flash: `python train.py --config configs/tiny.yaml --workdir runs/tiny [key=value ...]`.

With no data configured it trains on the Python standard library's own source files (no download).
See docs/training.md.
"""

import sys

from mimo_jax.training import main

if __name__ == "__main__":
    sys.exit(main())
