"""`python -m qat.bench` writes the JSON contract (tiny shapes: this checks wiring, not speed),
and every summary in it is the one its own raw per-round samples give."""

import json

import numpy as np
import pytest

from tests.conftest import run_cli

# Hand-made rounds where the usual mistakes give other answers. Per-round ratios a/b are
# [1, 2, 0.9, 0.5]: median 0.95, 25th/75th percentiles 0.8 and 1.25. Not the ratio of the
# medians (3/3 = 1), the mean of the ratios (1.1), the median of the ratios of the sorted,
# unpaired samples (1), nor of b/a (19/18, quartiles 0.875 and 4/3).
SAMPLES = {"a": [1.0, 4.0, 9.0, 2.0], "b": [1.0, 2.0, 10.0, 4.0]}


def test_medians_are_per_candidate_medians_over_rounds():
    from qat.bench import medians

    assert medians(SAMPLES) == {"a": 3.0, "b": 3.0}  # means would be 4 and 4.25
    assert medians({"x": [3.0, 1.0, 8.0], "y": [2.0, 6.0, 4.0, 4.0]}) == {"x": 3.0, "y": 4.0}


def test_paired_ratio_is_the_median_of_per_round_ratios():
    from qat.bench import paired_ratio

    assert paired_ratio(SAMPLES, "a", "b") == pytest.approx(0.95, rel=1e-12)
    assert paired_ratio(SAMPLES, "b", "a") == pytest.approx(19 / 18, rel=1e-12)
    rotated = {"a": SAMPLES["a"], "b": SAMPLES["b"][1:] + SAMPLES["b"][:1]}  # other pairs:
    assert paired_ratio(rotated, "a", "b") == pytest.approx(1.25, rel=1e-12)  # [.5 .4 2.25 2]


def test_ratio_spread_is_the_interquartile_range_of_per_round_ratios():
    from qat.bench import ratio_spread

    assert ratio_spread(SAMPLES, "a", "b") == pytest.approx([0.8, 1.25], rel=1e-12)
    assert ratio_spread(SAMPLES, "b", "a") == pytest.approx([0.875, 4 / 3], rel=1e-12)


@pytest.mark.slow
def test_bench_writes_the_contract(tmp_path):
    rounds = 3
    out = tmp_path / "bench.json"
    proc = run_cli("qat.bench", "--out", str(out), "--bn-shape", "8,8,8,4", "--image", "8,8,1",
                   "--batch", "8", "--width", "4", "--rounds", str(rounds), "--steps", "1",
                   "--threads", "1", "--arch", "MobileNet", "--arch-kwargs", "alpha=0.25",
                   "--arch-image", "32,32,3", "--arch-batch", "2", "--large-arch", "MobileNet",
                   "--large-arch-image", "32,32,3", "--large-arch-batch", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["bn_layer"]) == {"keras_fused", "naive", "qat_float", "qat_quant"}
    assert set(result["network"]) == {"float_phase", "quant_phase", "tfmot_default"}
    assert set(result["tflite"]) == {"float_ms", "int8_ms"}
    assert set(result["application"]) == {"app_float", "app_quant", "app_tfmot"}
    assert set(result["large_application"]) == {"large_float", "large_quant", "large_tfmot"}
    assert set(result["sync_bn"]) == {"float_per_replica", "float_sync", "quant_per_replica",
                                      "quant_sync"}
    parts = ("bn_layer", "network", "tflite", "application", "large_application", "sync_bn")
    assert all(v > 0 for part in parts for v in result[part].values())
    assert result["shapes"]["bn_input"] == [8, 8, 8, 4] and result["tensorflow"]
    assert result["threads"] == 1

    # Every figure is recomputed from the raw per-round samples written beside it.
    raw = result["rounds"]
    assert set(raw) == set(parts)
    for part, samples in raw.items():
        assert set(samples) == set(result[part]), part
        for name, values in samples.items():
            assert len(values) == rounds and all(v > 0 for v in values), (part, name)
            assert result[part][name] == float(np.median(values)), (part, name)
    assert set(result["ratios"]) == set(result["ratio_spread"]) == {
        "qat_quant/keras_fused", "qat_float/keras_fused", "naive/keras_fused",
        "quant_phase/float_phase", "quant_phase/tfmot_default", "app_quant/app_float",
        "app_quant/app_tfmot", "large_quant/large_float", "large_quant/large_tfmot",
        "float_sync/float_per_replica", "quant_sync/quant_per_replica"}
    for name, ratio in result["ratios"].items():
        a, b = name.split("/")
        (part,) = [part for part, samples in raw.items() if a in samples and b in samples]
        per_round = np.asarray(raw[part][a]) / np.asarray(raw[part][b])
        assert ratio == float(np.median(per_round)), name
        assert result["ratio_spread"][name] == [float(np.percentile(per_round, 25)),
                                                float(np.percentile(per_round, 75))], name
