"""`python -m qat.report RUN_DIR... --out RESULTS.md --plot results.png`: runs → table + plot.

A RUN_DIR may be a run (it has float/ or quant/) or a folder of runs (a sweep): runs are found
recursively. Each quant run is read beside the float run it was fine-tuned from (found through
`quant.init_from`): accuracy of the exported files, simulated PTQ, agreement, step time per
phase, file size. Runs of one setting (model, BN mode, bits, ranges, BN re-estimation) are one
row: the mean over their seeds ± half the min-max spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass

from qat.config import resolved_reestimate_batches
from qat.errors import report_error

SETTING_KEYS = ("model", "bn", "bits", "range", "reestimate")  # one table row per setting


@dataclass
class Row:
    """One finished quant run (one seed)."""
    run: str
    model: str
    bn: str
    bits: str
    range: str
    reestimate: int
    seed: int
    float_acc: float | None
    ptq_int8_acc: float | None  # the converter's PTQ, 8 bits
    ptq_sim_acc: float | None  # PTQ simulated at the run's bits (qat.ptq)
    qat_int8_acc: float | None
    agreement: float | None
    logit_error: float | None
    float_step_ms: float | None
    quant_step_ms: float | None
    int8_kb: float | None


@dataclass
class Setting:
    """The runs of one setting (model, BN mode, bits, ranges, re-estimation) over seeds."""
    key: tuple
    runs: list[Row]

    def values(self, metric: str) -> list[float]:
        return [v for v in (getattr(r, metric) for r in self.runs) if v is not None]

    def mean(self, metric: str) -> float | None:
        values = self.values(metric)
        return sum(values) / len(values) if values else None

    def spread(self, metric: str) -> float | None:
        """Half the min-max range over seeds (0 for one seed)."""
        values = self.values(metric)
        return (max(values) - min(values)) / 2 if values else None


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
    int8_bytes = report.get("int8_bytes")
    return Row(
        run=run,
        model=config.get("model", {}).get("name", "?"),
        bn=quant_cfg.get("bn", "?"),
        bits=f"w{quant_cfg.get('weight_bits', '?')}a{quant_cfg.get('activation_bits', '?')}",
        range=quant_cfg.get("range", "ema"),
        reestimate=resolved_reestimate_batches(
            quant_cfg.get("bn_reestimate_batches", 0), quant_cfg.get("weight_bits", 8),
            quant_cfg.get("activation_bits", 8),
            config.get("trainer", {}).get("strategy", "default")),
        seed=int(config.get("trainer", {}).get("seed", 0)),
        float_acc=float_metrics.get("val_accuracy"),
        ptq_int8_acc=report.get("ptq_int8_accuracy"),
        ptq_sim_acc=report.get("ptq_simulated_accuracy"),
        qat_int8_acc=report.get("tflite_int8_accuracy"),
        agreement=report.get("int8_agreement"),
        logit_error=report.get("int8_logit_error"),
        float_step_ms=float_metrics.get("step_time_ms"),
        quant_step_ms=quant_metrics.get("step_time_ms"),
        int8_kb=None if int8_bytes is None else int8_bytes / 1024,
    )


def _bits_order(bits: str) -> tuple[int, int]:
    """w8a8 before w4a8 before w4a4: most bits first."""
    try:
        weight, activation = bits[1:].split("a")
        return -int(weight), -int(activation)
    except ValueError:
        return 0, 0


def group_settings(rows: list[Row]) -> list[Setting]:
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(tuple(getattr(r, k) for k in SETTING_KEYS), []).append(r)
    order = lambda key: (key[0], key[1], _bits_order(key[2]), key[3], key[4])  # noqa: E731
    return [Setting(key, sorted(groups[key], key=lambda r: r.seed))
            for key in sorted(groups, key=order)]


def _cell(setting: Setting, metric: str, digits: int) -> str:
    mean, spread = setting.mean(metric), setting.spread(metric)
    if mean is None:
        return "–"
    if len(setting.values(metric)) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def markdown_table(settings: list[Setting]) -> str:
    head = ("| model | BN mode | bits | ranges | BN re-est. | seeds | float acc | PTQ int8 file "
            "(8 bits) | PTQ simulated (run bits) | QAT int8 file | agreement | logit err | "
            "quant step ms | int8 KB |")
    lines = [head, "|" + "---|" * 14]
    for s in settings:
        model, bn, bits, ranges, reest = s.key
        lines.append(
            f"| {model} | {bn} | {bits} | {ranges} | {reest or 'off'} | {len(s.runs)} | "
            f"{_cell(s, 'float_acc', 4)} | {_cell(s, 'ptq_int8_acc', 4)} | "
            f"{_cell(s, 'ptq_sim_acc', 4)} | {_cell(s, 'qat_int8_acc', 4)} | "
            f"{_cell(s, 'agreement', 4)} | {_cell(s, 'logit_error', 3)} | "
            f"{_cell(s, 'quant_step_ms', 1)} | {_cell(s, 'int8_kb', 1)} |")
    return "\n".join(lines)


def best_per_bits(settings: list[Setting]) -> list[str]:
    """For each model, BN mode and bits: the QAT setting whose int8 file scores best (mean over
    seeds), beside simulated PTQ at the same bits."""
    lines = []
    by_bits: dict[tuple, list[Setting]] = {}
    for s in settings:
        by_bits.setdefault(s.key[:3], []).append(s)
    for (model, bn, bits), group in by_bits.items():
        scored = [s for s in group if s.mean("qat_int8_acc") is not None]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda s: s.mean("qat_int8_acc"))
        others = ", ".join(f"{s.key[3]}{' + re-est.' if s.key[4] else ''} "
                           f"{s.mean('qat_int8_acc'):.4f}" for s in scored if s is not best)
        ptq = [s.mean("ptq_sim_acc") for s in group if s.mean("ptq_sim_acc") is not None]
        ptq_text = f"; PTQ simulated {ptq[0]:.4f}" if ptq else ""
        lines.append(f"- {model} ({bn}) {bits}: best {best.key[3]}"
                     f"{' + re-est.' if best.key[4] else ''} {best.mean('qat_int8_acc'):.4f} "
                     f"(others: {others}{ptq_text})")
    return lines


def plot(settings: list[Setting], path: str) -> None:
    """One panel per model: int8 file accuracy by bits for each QAT setting and simulated PTQ
    (mean over seeds, bars: min-max); last panel: step time per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({s.key[0] for s in settings})
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(4.5 * (len(models) + 1), 4),
                             squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        mine = [s for s in settings if s.key[0] == model]
        bits = sorted({s.key[2] for s in mine}, key=_bits_order)
        series: dict[str, dict[str, Setting]] = {}
        for s in mine:
            label = f"QAT {s.key[3]}{' + re-est.' if s.key[4] else ''} ({s.key[1]})"
            series.setdefault(label, {})[s.key[2]] = s
            series.setdefault(f"PTQ simulated ({s.key[1]})", {}).setdefault(s.key[2], s)
        for label, points in sorted(series.items()):
            metric = "ptq_sim_acc" if label.startswith("PTQ") else "qat_int8_acc"
            xs = [i for i, b in enumerate(bits) if b in points
                  and points[b].mean(metric) is not None]
            if not xs:
                continue
            means = [points[bits[i]].mean(metric) for i in xs]
            spreads = [points[bits[i]].spread(metric) for i in xs]
            ax.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=label,
                        linestyle="--" if label.startswith("PTQ") else "-")
        ax.set_xticks(range(len(bits)), bits)
        ax.set(title=model, xlabel="bits", ylabel="int8 file accuracy (mean over seeds)")
        ax.legend(fontsize=7)
    time_ax = axes[0][-1]
    for offset, (label, attr) in enumerate([("float phase", "float_step_ms"),
                                            ("quant phase", "quant_step_ms")]):
        values = [max((s.mean(attr) or 0.0) for s in settings if s.key[0] == m) for m in models]
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
    settings = group_settings([read_row(run) for run in runs])
    text = (f"# qat results\n\nGenerated by `python -m qat.report` on {machine()}.\n"
            "Accuracies are of the exported files on the validation split, except `PTQ "
            "simulated` (the fake-quantized float model, calibrated, nothing trained: "
            "qat.ptq); each cell is the mean over seeds ± half the min-max spread. "
            "`agreement`: share of images where the int8 file's argmax equals the QAT "
            "model's; `logit err`: mean |file - QAT logit| / std of the QAT logits. Step "
            "times are median train steps.\n\n" + markdown_table(settings) + "\n")
    best = best_per_bits(settings)
    if best:
        text += "\nBest QAT setting per model and bits (QAT int8 file accuracy):\n\n"
        text += "\n".join(best) + "\n"
    if args.plot:
        plot(settings, args.plot)
        text += f"\n![accuracy and step time]({os.path.basename(args.plot)})\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
