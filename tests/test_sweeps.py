"""Sweeps: a two-job multirun end to end, HParams read back, the report, missing plugins."""

import json
import struct
import zlib

import pytest

from qat.errors import ConfigError
from qat.plugins import EXTRA, PLUGINS, check_plugins
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
    proc = run_cli("qat.train", "-m", "phase=all", "quant.bn=params,fold", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    modes = set()
    for run in runs:
        for part in ("float/metrics.json", "quant/metrics.json", "export/report.json"):
            assert (run / part).is_file(), f"{run}/{part} missing"
        modes.add(json.loads((run / "quant" / "config.json").read_text())["quant"]["bn"])
    assert modes == {"params", "fold"}
    sessions = _hparams_sessions(sweep)
    assert sorted(h["bn"] for h, _ in sessions) == ["fold", "params"]
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


def _fixture_run(root, name, model, bn, bits, acc):
    float_dir = root / f"{model}_float" / "float"
    float_dir.mkdir(parents=True, exist_ok=True)
    (float_dir / "metrics.json").write_text(json.dumps({"val_accuracy": 0.99,
                                                        "step_time_ms": 10.0}))
    run = root / name
    (run / "quant").mkdir(parents=True)
    (run / "export").mkdir()
    (run / "quant" / "config.json").write_text(json.dumps({
        "model": {"name": model},
        "quant": {"bn": bn, "weight_bits": bits, "activation_bits": 8,
                  "init_from": str(float_dir)}}))
    (run / "quant" / "metrics.json").write_text(json.dumps({"val_accuracy": acc,
                                                            "step_time_ms": 12.5}))
    (run / "export" / "report.json").write_text(json.dumps({
        "tflite_int8_accuracy": acc, "int8_agreement": 0.995, "float_bytes": 4096,
        "int8_bytes": 1024, "ptq_int8_accuracy": 0.9}))


def test_report_writes_table_and_png(tmp_path):
    from qat.report import main

    _fixture_run(tmp_path, "a", "convnet", "params", 8, 0.98)
    _fixture_run(tmp_path, "b", "convnet", "fold", 4, 0.95)
    _fixture_run(tmp_path, "c", "resnet", "params", 8, 0.97)
    out, png = tmp_path / "RESULTS.md", tmp_path / "plot.png"
    assert main([str(tmp_path), "--out", str(out), "--plot", str(png)]) == 0
    table = out.read_text()
    row = "| convnet | fold | w4a8 | 0.9900 | 0.9000 | 0.9500 | 0.9950 | 10.0 | 12.5 | 4.0 | 1.0 |"
    assert row in table
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


def test_missing_plugin_from_the_cli(tmp_path):
    import importlib.util

    missing = [key for key, module in PLUGINS.items() if importlib.util.find_spec(
        module.split(".")[0]) is None or importlib.util.find_spec(module) is None]
    key = missing[0] if missing else None
    if key is None:  # every plugin is installed here: then the check must let the run through
        proc = run_cli("qat.train", "-m", "hydra/launcher=joblib", "trainer.batch_size=0")
        assert EXTRA not in proc.stderr
        return
    proc = run_cli("qat.train", "-m", key, f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    expected = f"qat: error: {key} needs a Hydra plugin that is not installed: {EXTRA}"
    assert proc.stderr.strip().splitlines()[-1] == expected
