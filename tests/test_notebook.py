"""notebooks/mimo_jax_colab.ipynb runs top to bottom on the CPU.

The notebook is executed with nbclient (no papermill): a cell is injected after the one tagged
`parameters`, as papermill would, to skip the install and to train a smaller model for 3 steps.
The kernel is the `python3` spec, which jupyter_client starts with this interpreter
(sys.executable), so it sees the same environment; the injected cell checks that too.
"""

import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "mimo_jax_colab.ipynb")
SMALL = [  # as tests/test_training.py: a few compiles' worth of model
    "model.vocab_size=259", "model.hidden_size=32", "model.num_layers=3", "model.layer_types=[global, swa, swa]",
    "model.mlp_types=[dense, moe, moe]", "model.qk_head_dim=24", "model.v_head_dim=16", "model.intermediate_size=48",
    "model.moe_intermediate_size=16", "model.num_experts=8", "model.num_experts_per_token=2",
    "model.sliding_window=7", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=0",
    "train.eval_batches=1",
]


def _parameters(workdir: str) -> str:
    return "\n".join([
        "INSTALL = False",
        "TRAIN_STEPS = 3",
        f"OVERRIDES = {SMALL!r}",
        "MAX_NEW_TOKENS = 16",
        f"WORKDIR = {workdir!r}",
        "import sys",
        "print(sys.prefix)",
    ])


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    injected = nbformat.v4.new_code_cell(_parameters(str(tmp_path / "run")),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, injected)

    # The kernel inherits this environment: the CPU only (libtpu is installed for the AOT tests, and
    # would otherwise probe for a TPU), one device rather than conftest's 8, programs compiled for
    # compile time rather than speed (as in tests/test_docs.py: a tiny model, a few steps).
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
                                    "--xla_llvm_disable_expensive_passes=true")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": ROOT}})
    try:
        client.execute()
    except CellExecutionError as e:  # its message holds the failing cell's source and traceback
        pytest.fail("a notebook cell failed:\n" + re.sub(r"\x1b\[[0-9;]*m", "", str(e)), pytrace=False)

    assert injected.outputs[0]["text"].strip() == sys.prefix, "the kernel runs another Python environment"
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "CPU backend" in text
    assert "speculative greedy output is identical to plain greedy output" in text
    assert "max |JAX - PyTorch| logit difference" in text
    assert "serve.py exited with code 0" in text
