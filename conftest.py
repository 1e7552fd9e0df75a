"""Tests run on the CPU, also when libtpu is installed (it is, for ahead-of-time TPU compiles)."""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
