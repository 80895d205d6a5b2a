"""`python -m qat.coverage`: keras.applications architectures through qat and through tfmot.

For each architecture (weights=None, built for the embedded digits data resized to
`--image-size`, 3 channels): a short float training, then qat (convert → quantize → fine-tune →
fold → full-int8 file, evaluated) and tfmot's `quantize_model` on the same float model (does it
quantize, train a step and convert to a full-int8 file?). Each architecture runs in its own
process (the TFLite converter leaks memory, FIELD-NOTES), and the table goes to `--out`.
Slow by design (minutes per architecture): `make coverage`, never `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ARCHS = {
    "MobileNet": {"alpha": 1.0}, "MobileNetV2": {"alpha": 1.0},
    "MobileNetV3Small": {"alpha": 0.75}, "MobileNetV3Large": {"alpha": 0.75},
    "ResNet50": {}, "ResNet101": {}, "ResNet50V2": {}, "ResNet101V2": {}, "EfficientNetB0": {},
    "EfficientNetV2B0": {}, "DenseNet121": {}, "DenseNet169": {}, "DenseNet201": {},
    "NASNetMobile": {},
    "RegNetX002": {}, "InceptionV3": {}, "Xception": {}, "ConvNeXtTiny": {},
}
MIN_SIZE = {"InceptionV3": 75, "Xception": 71}
BN_MOMENTUM = 0.9  # as qat's built-ins on this data (README, "Defaults worth knowing")
FLOAT_TARGET = 0.9  # float validation accuracy the float training stops at
QAT_EPOCHS = 1


def _data(image_size: int):
    import numpy as np

    from qat.config import DataConfig
    from qat.data import load_arrays

    arrays = load_arrays(DataConfig(image_size=image_size))

    def rgb(x):
        return np.repeat(x, 3, axis=-1) * 255.0  # pixels 0..255, as applications expect

    return rgb(arrays.x_train), arrays.y_train, rgb(arrays.x_val), arrays.y_val


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def run_arch(arch: str, image_size: int, float_epochs: int, out_dir: str,
             float_target: float = FLOAT_TARGET, qat_epochs: int = QAT_EPOCHS) -> dict:
    """Everything for one architecture, in this process; returns the table row."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    from qat.api import export_model, prepare
    from qat.config import QuantConfig
    from qat.export import TFLiteModel, accuracy
    from qat.quantize import quantize_model

    size = max(image_size, MIN_SIZE.get(arch, 0))
    x, y, x_val, y_val = _data(size)
    row: dict = {"arch": arch, "input": f"{size}x{size}x3", "kwargs": ARCHS.get(arch, {})}
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tf_keras.utils.set_random_seed(0)
    keras_model = getattr(tf_keras.applications, arch)(
        input_shape=(size, size, 3), classes=10, weights=None, classifier_activation=None,
        **ARCHS.get(arch, {}))
    bns = [layer for layer in keras_model.submodules
           if isinstance(layer, tf_keras.layers.BatchNormalization)]
    row["keras_bn"] = len(bns)
    for bn in bns:  # 0.99/0.999 moving averages barely move in a few epochs of 23 steps
        bn.momentum = BN_MOMENTUM
    keras_model.compile(tf_keras.optimizers.Adam(1e-3), loss, ["accuracy"])
    # Trained until float_target (at most float_epochs): agreement on a weakly trained net
    # measures its near-ties and the runtime's rounding, not the export (README, Coverage).
    row["float_target"], row["qat_epochs"] = float_target, qat_epochs
    for epoch in range(1, float_epochs + 1):
        keras_model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        row["float_acc"] = float(keras_model.evaluate(x_val, y_val, verbose=0)[1])
        row["float_epochs"] = epoch
        if row["float_acc"] >= float_target:
            break
    start = time.perf_counter()
    try:
        model = prepare(keras_model)
        diff = np.abs(model.predict(x_val[:64], verbose=0)
                      - keras_model.predict(x_val[:64], verbose=0)).max()
        row["convert_max_diff"] = float(diff)
        qmodel = quantize_model(model, QuantConfig())
        qmodel.compile(tf_keras.optimizers.Adam(1e-4), loss, ["accuracy"])
        qmodel.fit(x, y, batch_size=64, epochs=qat_epochs, verbose=0)
        report = export_model(qmodel, model, x_val, y_val, os.path.join(out_dir, arch))
        int8 = os.path.join(out_dir, arch, "model_int8.tflite")
        fast, reference = (TFLiteModel(int8, reference_kernels=ref)(x_val) for ref in (0, 1))
        row.update(qat="ok", qat_int8_acc=report["tflite_int8_accuracy"],
                   qat_agreement=report["int8_agreement"],
                   logit_error=report["int8_logit_error"],
                   runtime_agreement=float(np.mean(fast.argmax(-1) == reference.argmax(-1))),
                   fold_max_diff=report["fold_max_abs_diff"],
                   float_ops=len(report["int8_float_ops"]))
    except Exception as exc:  # the table records the failure; the run goes on
        traceback.print_exc()
        row.update(qat="fails", qat_error=_one_line(exc))
    row["qat_seconds"] = round(time.perf_counter() - start)
    try:
        tfmot_model = tfmot.quantization.keras.quantize_model(keras_model)
        tfmot_model.compile(tf_keras.optimizers.Adam(1e-4), loss)
        tfmot_model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
        converter = tf.lite.TFLiteConverter.from_keras_model(tfmot_model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = converter.inference_output_type = tf.int8
        path = os.path.join(out_dir, f"{arch}_tfmot.tflite")
        with open(path, "wb") as fh:
            fh.write(converter.convert())
        from qat.export import tflite_logits

        row.update(tfmot="ok", tfmot_int8_acc=accuracy(tflite_logits(path, x_val), y_val))
    except Exception as exc:
        row.update(tfmot="fails", tfmot_error=_one_line(exc))
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "# keras.applications coverage", "",
        "Generated by `make coverage` (`python -m qat.coverage`; raw rows in coverage.json): "
        "weights=None, the embedded digits data resized and repeated to 3 channels, float "
        f"training until {FLOAT_TARGET:.0%} validation accuracy (`--float-target`; a row with "
        "another target shows it beside its epochs) or `--float-epochs` (Keras BN "
        "momentum set to 0.9), then qat: convert, one QAT epoch (`--qat-epochs`; a row "
        "with more shows them beside qat), fold, full-int8 file. "
        "Accuracies are of the exported int8 files on the validation split (359 images). "
        "`agreement`: share of images where the file's argmax equals the QAT model's; "
        "`logit err`: mean |file − QAT logit| / std of the QAT logits; `runtime floor`: "
        "agreement of the same file with itself between TFLite's default (XNNPACK) and "
        "reference int8 kernels, two correct runtimes (the reference kernels round each "
        "requantization twice). The QAT model computes the file's int32 bias rounding "
        "(qat.bias_grid), as XNNPACK runs it, so agreement may exceed that floor. "
        "tfmot: `quantize_model`, one training step, full-int8 conversion.",
        "",
        "| arch | input | Keras BNs | float acc (epochs) | qat | int8 acc | agreement | logit err "
        "| runtime floor | float ops left | tfmot | tfmot int8 acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fig = {key: f"{r[key]:.4f}" if key in r else "–" for key in (
            "float_acc", "qat_int8_acc", "qat_agreement", "logit_error", "runtime_agreement",
            "tfmot_int8_acc")}
        target = r.get("float_target", FLOAT_TARGET)
        epochs = f"{r.get('float_epochs', '?')}" + (
            f", target {target:g}" if target != FLOAT_TARGET else "")
        qat = r.get("qat", "fails") + (
            f" ({r['qat_epochs']} QAT epochs)" if r.get("qat_epochs", QAT_EPOCHS) != QAT_EPOCHS
            else "")
        kwargs = ", ".join(f"{k}={v:g}" if type(v) in (int, float) else f"{k}={v}"
                           for k, v in r.get("kwargs", {}).items())
        arch = f"{r['arch']} ({kwargs})" if kwargs else r["arch"]
        lines.append(
            f"| {arch} | {r.get('input', '')} | {r.get('keras_bn', '')} | "
            f"{fig['float_acc']} ({epochs}) | {qat} | "
            f"{fig['qat_int8_acc']} | {fig['qat_agreement']} | {fig['logit_error']} | "
            f"{fig['runtime_agreement']} | {r.get('float_ops', '')} | {r.get('tfmot', 'fails')} "
            f"| {fig['tfmot_int8_acc']} |")
    errors = [(r["arch"], who, r[f"{who}_error"]) for r in rows for who in ("qat", "tfmot")
              if f"{who}_error" in r]
    if errors:
        lines += ["", "Failures (first line of each):", ""]
        lines += [f"- {arch}, {who}: `{error}`" for arch, who, error in errors]
    return "\n".join(lines) + "\n"


def _write(rows: list[dict], out: str) -> None:
    """The table, and its rows as JSON beside it (`--merge` re-runs some archs into them)."""
    with open(out, "w") as fh:
        fh.write(table(rows))
    with open(os.path.splitext(out)[0].lower() + ".json", "w") as fh:
        json.dump(rows, fh, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--float-epochs", type=int, default=12, help="at most")
    parser.add_argument("--float-target", type=float, default=FLOAT_TARGET,
                        help="float validation accuracy the float training stops at")
    parser.add_argument("--qat-epochs", type=int, default=QAT_EPOCHS)
    parser.add_argument("--out", default="experiments/COVERAGE.md")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the other archs from the JSON beside --out")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one arch, print JSON
    args = parser.parse_args(argv)
    if args.one:
        row = run_arch(args.one, args.image_size, args.float_epochs, tempfile.mkdtemp(),
                       args.float_target, args.qat_epochs)
        print("COVERAGE_ROW " + json.dumps(row))
        return 0
    rows = []
    kept = os.path.splitext(args.out)[0].lower() + ".json"
    if args.merge and os.path.isfile(kept):
        with open(kept) as fh:
            rows = [r for r in json.load(fh) if r["arch"] not in args.archs.split(",")]
    for arch in args.archs.split(","):
        proc = subprocess.run(
            [sys.executable, "-m", "qat.coverage", "--one", arch, "--image-size",
             str(args.image_size), "--float-epochs", str(args.float_epochs),
             "--float-target", str(args.float_target), "--qat-epochs", str(args.qat_epochs)],
            capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("COVERAGE_ROW ")]
        row = json.loads(found[-1].split(" ", 1)[1]) if found else {
            "arch": arch, "qat_error": (proc.stderr.strip().splitlines() or ["crashed"])[-1]}
        rows.append(row)
        rows.sort(key=lambda r: list(ARCHS).index(r["arch"]) if r["arch"] in ARCHS else 99)
        print(json.dumps(row), flush=True)
        _write(rows, args.out)  # after each arch: partial runs show
    return 0


if __name__ == "__main__":
    sys.exit(main())
