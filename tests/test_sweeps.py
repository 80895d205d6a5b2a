"""Sweeps: a two-job multirun end to end, HParams read back, the report, missing plugins."""

import json
import os
import struct
import zlib

import pytest

from qat.errors import ConfigError
from qat.plugins import EXTRA, check_plugins
from tests.conftest import run_cli


def _hparams_sessions(logdir):
    """(hparams, metric tags) of every HParams session written under `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = []
    for events in logdir.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        try:
            content = acc.PluginTagToContent("hparams")
        except KeyError:
            continue
        for raw in content.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
            if data.HasField("session_start_info"):
                hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                           for k, v in data.session_start_info.hparams.items()}
                sessions.append((hparams, set(acc.Tags()["tensors"])))
    return sessions


@pytest.mark.slow
def test_two_job_multirun_writes_separate_runs_with_hparams(tmp_path):
    sweep = tmp_path / "sweep"
    common = ["data=synthetic", "data.image_size=8", "model.width=4", "trainer.epochs=1",
              "quant.epochs=1", "trainer.verbose=0", f"hydra.sweep.dir={sweep}"]
    proc = run_cli("qat.train", "-m", "phase=all", "quant.bn=fold", "quant.range=ema,learned",
                   *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    modes = set()
    for run in runs:
        for part in ("float/metrics.json", "quant/metrics.json", "export/report.json"):
            assert (run / part).is_file(), f"{run}/{part} missing"
        modes.add(json.loads((run / "quant" / "config.json").read_text())["quant"]["range"])
    assert modes == {"ema", "learned"}
    sessions = _hparams_sessions(sweep)
    assert sorted(h["range"] for h, _ in sessions) == ["ema", "learned"]
    for hparams, tags in sessions:
        assert hparams["model"] == "convnet" and hparams["phase"] == "all"
        assert {"final/tflite_int8_accuracy", "final/int8_agreement",
                "final/quant_step_time_ms"} <= tags


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]
    return struct.unpack(">II", data[16:24])


def _fixture_run(root, name, model, bn, bits, acc, seed=0, ranges="ema"):
    float_dir = root / f"{model}_float{seed}" / "float"
    float_dir.mkdir(parents=True, exist_ok=True)
    (float_dir / "metrics.json").write_text(json.dumps({"val_accuracy": 0.99,
                                                        "step_time_ms": 10.0}))
    run = root / name
    (run / "quant").mkdir(parents=True)
    (run / "export").mkdir()
    (run / "quant" / "config.json").write_text(json.dumps({
        "model": {"name": model}, "trainer": {"seed": seed},
        "quant": {"bn": bn, "weight_bits": bits, "activation_bits": 8, "range": ranges,
                  "init_from": str(float_dir)}}))
    (run / "quant" / "metrics.json").write_text(json.dumps({"val_accuracy": acc,
                                                            "step_time_ms": 12.5}))
    (run / "export" / "report.json").write_text(json.dumps({
        "tflite_int8_accuracy": acc, "int8_agreement": 0.995, "int8_logit_error": 0.01,
        "float_bytes": 4096, "int8_bytes": 1024, "ptq_int8_accuracy": 0.9,
        "ptq_simulated_accuracy": 0.5 + seed / 10}))


def test_report_averages_seeds_of_a_setting_and_writes_table_and_png(tmp_path):
    from qat.report import main

    _fixture_run(tmp_path, "a", "convnet", "params", 8, 0.98)
    _fixture_run(tmp_path, "b0", "convnet", "fold", 4, 0.95, seed=0)
    _fixture_run(tmp_path, "b1", "convnet", "fold", 4, 0.91, seed=1)
    _fixture_run(tmp_path, "b2", "convnet", "fold", 4, 0.96, seed=2, ranges="learned")
    _fixture_run(tmp_path, "c", "resnet", "params", 8, 0.97)
    out, png = tmp_path / "RESULTS.md", tmp_path / "plot.png"
    assert main([str(tmp_path), "--out", str(out), "--plot", str(png)]) == 0
    table = out.read_text()
    # Two seeds of (convnet, fold, w4a8, ema): means 0.93 and 0.55, spreads (max-min)/2.
    row = ("| convnet | fold | w4a8 | ema | off | 2 | 0.9900 ± 0.0000 | 0.9000 ± 0.0000 | "
           "0.5500 ± 0.0500 | 0.9300 ± 0.0200 | 0.9950 ± 0.0000 | 0.010 ± 0.000 | "
           "12.5 ± 0.0 | 1.0 ± 0.0 |")
    assert row in table, table
    assert "| convnet | fold | w4a8 | learned | off | 1 | 0.9900 | 0.9000 | 0.7000 | 0.9600 |" \
        in table
    assert "convnet (fold) w4a8: best learned 0.9600 (others: ema 0.9300" in table
    assert table.count("| resnet |") == 1 and "cores" in table
    width, height = _png_size(png)
    assert width > 300 and height > 200


def test_report_without_runs_fails_clearly(tmp_path, capsys):
    from qat.report import main

    assert main([str(tmp_path)]) == 2
    assert "no finished quant runs" in capsys.readouterr().err


def test_missing_plugin_names_the_extra():
    with pytest.raises(ConfigError, match=r"hydra/launcher=joblib needs .*qat\[sweep\]"):
        check_plugins(["-m", "hydra/launcher=joblib"], installed=lambda module: False)
    check_plugins(["hydra/launcher=joblib"], installed=lambda module: True)  # no error
    check_plugins(["phase=quant"], installed=lambda module: False)  # nothing needed


# Stands in for hydra-joblib-launcher: registers Hydra's own basic launcher as
# hydra/launcher=joblib, so a run gets past the plugin check and Hydra can compose and launch it.
JOBLIB_STAND_IN = """
from hydra.core.config_store import ConfigStore

ConfigStore.instance().store(
    group="hydra/launcher", name="joblib", provider="qat-tests",
    node={"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})
"""


def _plugins_env(root, *, installed):
    """A PYTHONPATH under which the sweep plugins are all missing (installed=False) or the joblib
    launcher is installed (a stand-in), whatever this machine has: both branches run anywhere."""
    package = root / "hydra_plugins"
    if installed:  # a namespace portion (no __init__.py) found before any installed one
        (package / "hydra_joblib_launcher").mkdir(parents=True)
        (package / "hydra_joblib_launcher" / "__init__.py").write_text(JOBLIB_STAND_IN)
    else:  # a regular package wins over every namespace portion: no hydra_plugins.* module
        package.mkdir(parents=True)  # can be found, which is what qat.plugins checks
        (package / "__init__.py").write_text("")
    path = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(path)}


@pytest.mark.parametrize("key", ["hydra/launcher=joblib", "hydra/sweeper=optuna"])
def test_missing_plugin_from_the_cli(tmp_path, key):
    env = _plugins_env(tmp_path / "path", installed=False)
    proc = run_cli("qat.train", "-m", key, f"run.dir={tmp_path / 'run'}",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", extra_env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = f"qat: error: {key} needs a Hydra plugin that is not installed: {EXTRA}"
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_installed_plugin_lets_the_cli_through(tmp_path):
    """The plugin check passes, Hydra composes the launcher and the job's config validation
    runs: its error, not the plugin message, is what the command ends with."""
    env = _plugins_env(tmp_path / "path", installed=True)
    proc = run_cli("qat.train", "-m", "hydra/launcher=joblib", "trainer.batch_size=0",
                   f"run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   extra_env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "qat: error: trainer.batch_size=0 must be >= 1")
    assert EXTRA not in proc.stderr
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()  # Hydra did start the sweep
