import json
import subprocess
import sys

from mimo_jax import demo


def test_params_cli_counts_the_released_model():
    out = subprocess.run([sys.executable, "-m", "mimo_jax.params", "configs/mimo_v2_flash.yaml"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"main": 308_778_780_864, "mtp": 987_820_224, "active": 14_820_985_024}


def test_params_cli_rejects_unknown_override():
    proc = subprocess.run([sys.executable, "-m", "mimo_jax.params", "tiny", "model.layers=3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no key 'layers'" in proc.stderr


def test_demo_round_trips_the_tiny_model(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bf16 export" in out and "reloaded logits max |diff| = 0\n" in out
    assert (tmp_path / "fp8" / "model_mtp.safetensors").exists()
