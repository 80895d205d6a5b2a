"""Config: schema errors at compose time (before TensorFlow), range errors as one line."""

import pytest
from hydra import compose, initialize_config_dir

from qat.config import register_configs, to_settings
from qat.errors import ConfigError
from tests.conftest import REPO, run_cli

register_configs()


def _compose(*overrides):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_compose_and_resolve():
    settings = to_settings(_compose())
    assert settings.phase.steps == ("float",)
    assert settings.data.name == "digits" and settings.model.name == "convnet"
    assert settings.run.dir == "runs/default"
    assert settings.quant.bn == "params"


@pytest.mark.parametrize("overrides, batches", [
    ([], 0),  # 8 bits: off
    (["quant.weight_bits=4"], 20),  # below 8 bits: re-estimate (make experiments)
    (["quant.activation_bits=4"], 20),
    (["quant.weight_bits=4", "trainer.strategy=mirrored"], 0),  # cannot run distributed
    (["quant.weight_bits=4", "quant.bn_reestimate_batches=0"], 0),  # explicit wins
    (["quant.bn_reestimate_batches=5"], 5),
])
def test_bn_reestimation_defaults_on_below_8_bits(overrides, batches):
    assert to_settings(_compose(*overrides)).reestimate_batches == batches


def test_export_can_be_left_for_later():
    assert to_settings(_compose("phase=quant")).steps == ("quant", "export")
    assert to_settings(_compose("phase=quant", "export.enabled=false")).steps == ("quant",)


def test_groups_select_settings():
    settings = to_settings(_compose("phase=all", "model=mobilenet", "quant.bn=fold",
                                    "quant.weight_bits=4", "run.name=exp1"))
    assert settings.phase.steps == ("float", "quant", "export")
    assert settings.model.name == "mobilenet"
    assert (settings.quant.bn, settings.quant.weight_bits) == ("fold", 4)
    assert settings.run.dir == "runs/exp1"


@pytest.mark.parametrize("override, key", [
    ("quant.weight_bits=1", "quant.weight_bits"),
    ("quant.activation_bits=17", "quant.activation_bits"),
    ("trainer.epochs=-1", "trainer.epochs"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("quant.bn=banana", "quant.bn"),
    ("phase=quant", None),
])
def test_range_checks(override, key):
    if key is None:  # a valid override: must not raise
        to_settings(_compose(override))
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_settings(_compose(override))


@pytest.mark.parametrize("overrides, model_range", [
    ([], [0.0, 1.0]),
    (["data.normalize=symmetric"], [-1.0, 127 / 128]),
    (["data.normalize=mean_std", "data.mean=[0.5]", "data.std=[0.25]"], [-2.0, 2.0]),
    (["data.normalize=mean_std", "data.mean=[0.4,0.5,0.6]", "data.std=[0.2,0.25,0.5]"],
     [-2.0, 3.0]),  # channel 0 reaches -2 and 3
])
def test_the_input_range_goes_through_the_normalization(overrides, model_range):
    settings = to_settings(_compose(*overrides))
    assert settings.quant.input_range == [0.0, 1.0]  # configured in pixels
    assert settings.model_quant().input_range == pytest.approx(model_range)


@pytest.mark.parametrize("overrides, key", [
    (["data.normalize=banana"], "data.normalize"),
    (["data.normalize=mean_std"], "data.normalize"),
    (["data.mean=[0.5]", "data.std=[0.5]"], "data.mean"),
    (["data.normalize=mean_std", "data.mean=[0.5]", "data.std=[0.5,0.5]"], "data.mean"),
    (["data.normalize=mean_std", "data.mean=[0.5]", "data.std=[0.0]"], "data.std"),
])
def test_normalization_errors(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_settings(_compose(*overrides))


@pytest.mark.parametrize("override, needle", [
    ("trainer.epoch=3", "trainer.epoch"),
    ("trainer.epochs=two", "trainer.epochs"),
])
def test_cli_rejects_typos_and_wrong_types(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    proc = run_cli("qat.train", override, f"run.dir={run_dir}", timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not run_dir.exists()


def test_cli_out_of_range_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("qat.train", "trainer.batch_size=0", f"run.dir={run_dir}", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "qat: error: trainer.batch_size=0 must be >= 1"
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()
