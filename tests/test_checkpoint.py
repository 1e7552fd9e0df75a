"""mimo_jax.checkpoint: the one loader and its precedence (a train.py workdir before a Hugging Face
directory), read by every path that loads a model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax import MiMoV2Flash, load_config, save_hf
from mimo_jax.checkpoint import HF, WORKDIR, initial_model, load_model, model_source, sharded_initializer
from mimo_jax.serving import load_served
from mimo_jax.sharding import make_mesh
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


def test_initialisation_creates_every_array_in_its_shards_on_8_devices():
    cfg = load_config("configs/cpu_1b.yaml")  # about 1.0B parameters; the default mesh: fsdp over all 8 devices
    graphdef, abstract_state, _, init = sharded_initializer(cfg, make_mesh(cfg.mesh))
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    assert 1.0e9 < sum(x.size for x in jax.tree.leaves(abstract_state)) < 1.1e9
    memory = init.lower().compile().memory_analysis()  # per device: the partitioned program
    # Each device's outputs are its 1/8 share. The temporaries are the random-number generation of
    # the shard being sampled (its bits and its normal before the scaling: about half a share, the
    # largest parameter's), where an unsharded init holds the whole model on one device. With
    # XLA:CPU's concurrency-optimised scheduler (conftest.py turns it off) every shard's
    # temporaries are live at once: 1.5 shares.
    assert memory.output_size_in_bytes == pytest.approx(total / 8, rel=0.01)
    assert memory.output_size_in_bytes + memory.temp_size_in_bytes < 1.6 * total / 8, (memory, total)
