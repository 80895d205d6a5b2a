"""The CLI end to end, as a user runs it: float, quant, export, and their clear failures."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in logdir.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["tensors"])
    return tags


def test_float_then_quant_on_digits(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("qat.train", "phase=float", f"run.dir={run}", "trainer.verbose=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "float" / "checkpoint").exists()
    assert list((run / "float").glob("ckpt-*.index"))
    float_metrics = json.loads((run / "float" / "metrics.json").read_text())
    for key in ("val_accuracy", "val_loss", "step_time_ms", "examples_per_sec", "epochs", "steps"):
        assert key in float_metrics
    assert float_metrics["val_accuracy"] >= 0.95
    tags = _tags(run / "tb" / "float")
    assert {"epoch_accuracy", "epoch_loss", "step_time_ms", "examples_per_sec"} <= tags

    proc = run_cli("qat.train", "phase=quant", f"run.dir={run}", "trainer.verbose=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    quant_metrics = json.loads((run / "quant" / "metrics.json").read_text())
    assert abs(quant_metrics["val_accuracy"] - float_metrics["val_accuracy"]) <= 0.01
    assert {"epoch_accuracy", "step_time_ms"} <= _tags(run / "tb" / "quant")
    report = json.loads((run / "export" / "report.json").read_text())
    assert report["int8_agreement"] >= 0.99
    assert abs(report["tflite_int8_accuracy"] - float_metrics["val_accuracy"]) <= 0.01

    # A finished phase is not overwritten by accident...
    again = run_cli("qat.train", "phase=float", f"run.dir={run}", "trainer.epochs=1")
    assert again.returncode == 2 and "run.overwrite=true" in again.stderr
    assert json.loads((run / "float" / "metrics.json").read_text()) == float_metrics
    # ...and the standalone exporter re-exports the run from its stored config.
    export = run_cli("qat.export", f"run.dir={run}")
    assert export.returncode == 0, export.stderr[-3000:]
    assert json.loads(export.stdout[export.stdout.index("{"):])["int8_agreement"] >= 0.99


def test_quant_without_float_checkpoint_fails_clearly(tmp_path):
    proc = run_cli("qat.train", "phase=quant", f"run.dir={tmp_path / 'empty'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("qat: error: no float checkpoint") and "phase" in lines[-1]
    assert not (tmp_path / "empty" / "quant").exists()


def test_export_without_quant_checkpoint_fails_clearly(tmp_path):
    proc = run_cli("qat.export", f"run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "no quant checkpoint" in proc.stderr and "phase=quant" in proc.stderr
