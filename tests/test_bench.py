"""`python -m qat.bench` writes the JSON contract (tiny shapes: this checks wiring, not speed)."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_bench_writes_the_contract(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("qat.bench", "--out", str(out), "--bn-shape", "8,8,8,4", "--image", "8,8,1",
                   "--batch", "8", "--width", "4", "--rounds", "3", "--steps", "1",
                   "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["bn_layer"]) == {"keras_fused", "naive", "qat_float", "qat_quant"}
    assert set(result["network"]) == {"float_phase", "quant_phase", "tfmot_default"}
    assert set(result["tflite"]) == {"float_ms", "int8_ms"}
    assert all(v > 0 for part in ("bn_layer", "network", "tflite") for v in result[part].values())
    assert result["shapes"]["bn_input"] == [8, 8, 8, 4] and result["tensorflow"]
    assert result["threads"] == 1
    for name, ratio in result["ratios"].items():
        low, high = result["ratio_spread"][name]
        assert 0 < low <= ratio <= high, name
