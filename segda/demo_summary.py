"""`segda demo --summarize DIR [DIR ...]`: the studies of several seeds as one table, mean ± standard error.

    for s in 0 1 2; do segda demo --out demo-$s --seed $s --oracle; done
    segda demo --summarize demo-0 demo-1 demo-2

Per model: mIoU on each validation set, and on the target the share of the `source` -> `source+lora` gain it
recovers. Then, per class, what self-training's pseudo-labels add (`source+uda` - `source+uda-nopseudo`) and what
self-training adds in all (`source+uda` - `source`), averaged over the studies.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from segda.log import SegdaError

TARGET = "cityscapes-val"


def load_reports(folders: list[str | Path]) -> list[dict]:
    reports = []
    for folder in folders:
        path = Path(folder) / "report.json"
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise SegdaError(f"{path}: cannot read a study's report ({err}); give folders written by `segda demo`")
    return reports


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _fmt(values: list, scale: float = 100.0, digits: int = 1) -> str:
    """mean ± standard error of the values that exist (a class no model saw nor predicted has no IoU: None)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, se = mean_se([v * scale for v in values])
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def summarize(reports: list[dict]) -> str:
    pairs = [{(p["model"], p["data"]): p for p in r["pairs"]} for r in reports]
    models = list(dict.fromkeys(m for m, _ in pairs[0]))
    datasets = list(dict.fromkeys(d for _, d in pairs[0]))
    missing = [(i, key) for i, table in enumerate(pairs) for key in pairs[0] if key not in table]
    if missing:
        raise SegdaError(f"study {missing[0][0] + 1} has no {missing[0][1][0]} x {missing[0][1][1]} pair: summarize "
                         "studies of the same segda demo options")
    seeds = ", ".join(str(r.get("extra", {}).get("seed", "?")) for r in reports)
    lines = [f"mIoU (%) over {len(reports)} studies (seeds {seeds}), mean ± standard error", "",
             "| model | " + " | ".join(datasets) + " | share of the source -> source+lora gain |",
             "|---|" + "---:|" * (len(datasets) + 1)]
    have_gain = all((m, TARGET) in pairs[0] for m in ("source", "source+lora"))
    for model in models:
        cells = [_fmt([t[(model, d)]["miou"] for t in pairs]) for d in datasets]
        share = ""
        if have_gain and (model, TARGET) in pairs[0]:
            shares = [_share(t[(model, TARGET)]["miou"], t[("source", TARGET)]["miou"],
                             t[("source+lora", TARGET)]["miou"]) for t in pairs]
            share = _fmt(shares, 100.0, 0) + (" %" if any(v is not None for v in shares) else "")
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {share} |")
    if all((m, TARGET) in pairs[0] for m in ("source", "source+uda", "source+uda-nopseudo")):
        lines += ["", f"IoU change per class on {TARGET} (points, mean over the studies)", "",
                  "| class | pseudo-labels: uda - uda-nopseudo | self-training: uda - source |", "|---|---:|---:|"]
        for name in reports[0]["class_names"]:
            change = lambda t, a, b: _minus(t[(a, TARGET)]["iou"].get(name), t[(b, TARGET)]["iou"].get(name))  # noqa: E731
            lines.append(f"| {name} | " + _fmt([change(t, "source+uda", "source+uda-nopseudo") for t in pairs])
                         + " | " + _fmt([change(t, "source+uda", "source") for t in pairs]) + " |")
    return "\n".join(lines)


def _share(model: float, source: float, labelled: float) -> float | None:
    """The share of the labelled adapter's gain a model recovers; None where that gain is zero."""
    return None if labelled == source else (model - source) / (labelled - source)


def _minus(a, b):
    return None if a is None or b is None else a - b
