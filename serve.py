"""Serve MiMo-V2-Flash over an OpenAI-compatible HTTP API:
`python serve.py --model PATH [--host 127.0.0.1 --port 8000 --num-slots 8 --max-seq-len N --no-speculative]`.

PATH is a Hugging Face checkpoint directory or a train.py workdir. See docs/serving.md.
"""

import sys

from mimo_jax.serving import main

if __name__ == "__main__":
    sys.exit(main())
