"""`python -m qat.report RUN_DIR... --out RESULTS.md --plot results.png`: runs → table + plot.

A RUN_DIR may be a run (it has float/ or quant/) or a folder of runs (a sweep): runs are found
recursively. Each quant run is one row, beside the float run it was fine-tuned from (found
through `quant.init_from`), with the accuracy of the exported files, agreement, step time per
phase and file sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass

from qat.errors import report_error

ROW_KEYS = ("model", "bn", "bits", "float_acc", "ptq_int8_acc", "qat_int8_acc", "agreement",
            "float_step_ms", "quant_step_ms", "float_kb", "int8_kb")


@dataclass
class Row:
    run: str
    model: str
    bn: str
    bits: str
    float_acc: float | None
    ptq_int8_acc: float | None
    qat_int8_acc: float | None
    agreement: float | None
    float_step_ms: float | None
    quant_step_ms: float | None
    float_kb: float | None
    int8_kb: float | None


def _load(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}


def find_runs(paths: list[str]) -> list[str]:
    """Every directory under `paths` that holds a finished quant phase."""
    found = []
    for root in paths:
        for current, dirs, _ in os.walk(root):
            if os.path.isfile(os.path.join(current, "quant", "metrics.json")):
                found.append(current)
            dirs[:] = [d for d in dirs if d not in ("float", "quant", "export", "tb")]
    return sorted(set(found))


def read_row(run: str) -> Row:
    config = _load(os.path.join(run, "quant", "config.json"))
    quant_cfg = config.get("quant", {})
    float_dir = quant_cfg.get("init_from") or os.path.join(run, "float")
    float_metrics = _load(os.path.join(float_dir, "metrics.json"))
    quant_metrics = _load(os.path.join(run, "quant", "metrics.json"))
    report = _load(os.path.join(run, "export", "report.json"))
    kb = lambda v: None if v is None else v / 1024  # noqa: E731
    return Row(
        run=run,
        model=config.get("model", {}).get("name", "?"),
        bn=quant_cfg.get("bn", "?"),
        bits=f"w{quant_cfg.get('weight_bits', '?')}a{quant_cfg.get('activation_bits', '?')}",
        float_acc=float_metrics.get("val_accuracy"),
        ptq_int8_acc=report.get("ptq_int8_accuracy"),
        qat_int8_acc=report.get("tflite_int8_accuracy"),
        agreement=report.get("int8_agreement"),
        float_step_ms=float_metrics.get("step_time_ms"),
        quant_step_ms=quant_metrics.get("step_time_ms"),
        float_kb=kb(report.get("float_bytes")),
        int8_kb=kb(report.get("int8_bytes")),
    )


def _fmt(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    head = ("| model | BN mode | bits | float acc | PTQ int8 acc | QAT int8 acc | agreement | "
            "float step ms | quant step ms | float KB | int8 KB |")
    lines = [head, "|" + "---|" * len(ROW_KEYS)]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.bn} | {r.bits} | {_fmt(r.float_acc, 4)} | "
            f"{_fmt(r.ptq_int8_acc, 4)} | {_fmt(r.qat_int8_acc, 4)} | {_fmt(r.agreement, 4)} | "
            f"{_fmt(r.float_step_ms, 1)} | {_fmt(r.quant_step_ms, 1)} | {_fmt(r.float_kb, 1)} | "
            f"{_fmt(r.int8_kb, 1)} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    """Left: int8 accuracy by bit width per model and BN mode. Right: step time per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r.qat_int8_acc is not None:
            bits = int(r.bits[1:].split("a")[0])
            series.setdefault((r.model, r.bn), []).append((bits, r.qat_int8_acc))
    for (model, bn), points in sorted(series.items()):
        points.sort()
        acc_ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{model} ({bn})")
    acc_ax.set(xlabel="weight bits", ylabel="int8 file accuracy", title="Accuracy vs bits")
    acc_ax.legend(fontsize=8)
    models = sorted({r.model for r in rows})
    for offset, (label, attr) in enumerate([("float phase", "float_step_ms"),
                                            ("quant phase", "quant_step_ms")]):
        values = [max((getattr(r, attr) or 0.0) for r in rows if r.model == m) for m in models]
        time_ax.bar([i + 0.4 * offset for i in range(len(models))], values, width=0.4,
                    label=label)
    time_ax.set_xticks([i + 0.2 for i in range(len(models))], models)
    time_ax.set(ylabel="median train step (ms)", title="Step time per phase")
    time_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories or folders of runs")
    parser.add_argument("--out", help="markdown file (default: print)")
    parser.add_argument("--plot", help="PNG file for the plot")
    args = parser.parse_args(argv)
    runs = find_runs(args.runs)
    if not runs:
        return report_error(f"no finished quant runs under {args.runs}: run "
                            "`python -m qat.train phase=quant` first")
    rows = [read_row(run) for run in runs]
    rows.sort(key=lambda r: (r.model, r.bn, r.bits))
    text = (f"# qat results\n\nGenerated by `python -m qat.report` on {machine()}.\n"
            "Accuracies are of the exported files on the validation split; step times are "
            "median train steps.\n\n" + markdown_table(rows) + "\n")
    if args.plot:
        plot(rows, args.plot)
        text += f"\n![accuracy and step time]({os.path.basename(args.plot)})\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
