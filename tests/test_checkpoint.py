"""mimo_jax.checkpoint: the one loader and its precedence (a train.py workdir before a Hugging Face
directory), read by every path that loads a model."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax import MiMoV2Flash, load_config, save_hf
from mimo_jax.checkpoint import HF, WORKDIR, initial_model, load_model, model_source
from mimo_jax.serving import load_served
from tests.conftest import write_workdir


def test_a_directory_with_both_layouts_loads_as_the_workdir_everywhere(tmp_path, small_overrides):
    cfg = load_config("tiny", [*small_overrides, "model.vocab_size=260"])  # the byte tokenizer fits
    trained, exported = MiMoV2Flash(cfg.model, rngs=nnx.Rngs(1)), MiMoV2Flash(cfg.model, rngs=nnx.Rngs(2))
    both, hf_only = tmp_path / "both", tmp_path / "hf"
    write_workdir(str(both), cfg, trained)
    save_hf(exported, str(both), dtype=jnp.float32)  # other weights, exported into the run's directory
    save_hf(exported, str(hf_only), dtype=jnp.float32)
    assert model_source(str(both)) == WORKDIR and model_source(str(hf_only)) == HF

    want, other = np.asarray(trained.embed[...]), np.asarray(exported.embed[...])
    assert not np.allclose(want, other)
    np.testing.assert_array_equal(load_model(str(both)).embed[...], want)
    np.testing.assert_array_equal(load_served(str(both)).model.embed[...], want)  # serve.py --model
    run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(both)))
    np.testing.assert_array_equal(initial_model(run).embed[...], want)  # train.init_from, MOPD students
    np.testing.assert_array_equal(load_model(str(hf_only), jnp.float32).embed[...], other)

    with pytest.raises(FileNotFoundError, match=r"empty: neither a train.py workdir"):
        model_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"train.init_from=.*empty.*neither"):
        initial_model(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(tmp_path / "empty"))))
