"""The evaluation report of a model x dataset matrix: metrics, report.json, report.md and figures.

The evaluator accumulates one 19x19 confusion matrix per (model, dataset) pair and hands the list here:

    report = write_report("runs/eval", results, extra={"adapter_bytes": 1234567})
    print(format_matrix(report["pairs"]))

Metrics follow mmsegmentation/DAFormer: a class absent from both ground truth and prediction has no IoU and is left
out of the mean, so a dataset without trains does not drag mIoU down with a meaningless 0. Every file is published
atomically (segda.atomic), so a reader never sees half a report.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segda import atomic
from segda.classes import CLASS_NAMES, NUM_CLASSES, PROTOCOLS, colorize
from segda.log import SegdaError

DASH = "–"
"""Table cell of a pair that was not evaluated, or of a class without IoU."""

GAP = 4
"""White pixels between panels (and rows) of the example grid."""


def metrics_from_confusion(confusion: np.ndarray, protocol: str = "19") -> dict:
    """Standard metrics of a 19x19 (gt x pred) confusion matrix of non-ignored pixels; the mIoU and mean accuracy
    average the classes of `protocol` (classes.PROTOCOLS: 19, synthia16, synthia13).

    iou[c] is None where class c is absent from both ground truth and prediction (union 0). mIoU averages the other
    IoUs; with no pixels at all every IoU is None and mIoU, pixel and mean accuracy are 0.0 (not nan, which JSON
    cannot hold and which would poison a mean over pairs silently).
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.shape != (NUM_CLASSES, NUM_CLASSES):
        raise SegdaError(f"confusion matrix has shape {cm.shape}, expected ({NUM_CLASSES}, {NUM_CLASSES})")
    if protocol not in PROTOCOLS:
        raise SegdaError(f"unknown evaluation protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    scored = np.zeros(NUM_CLASSES, dtype=bool)
    scored[list(PROTOCOLS[protocol])] = True
    tp = np.diag(cm)
    gt_count, pred_count = cm.sum(axis=1), cm.sum(axis=0)
    union = gt_count + pred_count - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    in_gt = gt_count > 0
    acc = np.divide(tp, gt_count, out=np.zeros_like(tp), where=in_gt)
    total = cm.sum()
    averaged, accurate = present & scored, in_gt & scored
    return {
        "iou": [float(v) if p else None for v, p in zip(iou, present)],
        "miou": float(iou[averaged].mean()) if averaged.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "mean_accuracy": float(acc[accurate].mean()) if accurate.any() else 0.0,
        "num_pixels": int(total), "protocol": protocol, "protocol_classes": int(scored.sum()),
    }


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100.0 * value:.1f}"


def _md(label: str) -> str:
    return str(label).replace("|", "\\|")  # a '|' in a label would split the Markdown cell


def _miou(pair: dict) -> float:
    return pair["miou"] if "miou" in pair else metrics_from_confusion(pair["confusion"], pair.get("protocol", "19"))["miou"]


def format_matrix(pairs: list[dict]) -> str:
    """The mIoU matrix as a Markdown table: rows models, columns datasets (first-appearance order), percent.

    Takes either write_report's input results (mIoU computed from "confusion") or report.json's "pairs".
    """
    models = list(dict.fromkeys(p["model"] for p in pairs))
    datas = list(dict.fromkeys(p["data"] for p in pairs))
    cell = {(p["model"], p["data"]): _miou(p) for p in pairs}
    lines = ["| model | " + " | ".join(_md(d) for d in datas) + " |", "|---|" + "---:|" * len(datas)]
    for m in models:
        lines.append(f"| {_md(m)} | " + " | ".join(_pct(cell.get((m, d))) for d in datas) + " |")
    return "\n".join(lines)


def sanitize(label: str) -> str:
    """A label as a file-name part: only [A-Za-z0-9_.+-], everything else becomes '-'."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", str(label)) or "-"


def _pair_entry(result: dict) -> dict:
    confusion = np.asarray(result["confusion"], dtype=np.int64)
    metrics = metrics_from_confusion(confusion, result.get("protocol", "19"))
    return {
        "model": result["model"], "data": result["data"], "protocol": metrics["protocol"],
        "model_path": str(result["model_path"]), "data_spec": str(result["data_spec"]),
        "miou": metrics["miou"], "iou": dict(zip(CLASS_NAMES, metrics["iou"])),
        "pixel_accuracy": metrics["pixel_accuracy"], "mean_accuracy": metrics["mean_accuracy"],
        "num_samples": int(result["num_samples"]), "num_pixels": metrics["num_pixels"],
        "skipped": int(result["skipped"]), "confusion": confusion.tolist(),
    }


def _plain(obj):
    """numpy scalars/arrays in `extra` -> plain Python, so json.dumps accepts them."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    try:
        with atomic.atomic_path(path) as tmp:
            # Margins are fixed when the figure is made (subplots_adjust): bbox_inches="tight" would draw every
            # figure twice, and zlib's fastest level writes a 1000x900 chart 3x faster for ~1.3x the bytes.
            fig.savefig(tmp, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    finally:
        plt.close(fig)  # figures live in pyplot's registry until closed: a long matrix would leak memory


def _plot_confusion(pair: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    cm = np.asarray(pair["confusion"], dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)  # a class absent from gt keeps a 0 row
    fig, ax = plt.subplots(figsize=(10, 9))
    fig.subplots_adjust(left=0.14, right=0.95, bottom=0.14, top=0.95)  # room for the longest class names, drawn once
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=90)
    ax.set_yticks(range(NUM_CLASSES), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{pair['model']} @ {pair['data']}  (mIoU {_pct(pair['miou'])}, row-normalised)")
    for i, j in zip(*np.nonzero(norm >= 0.01)):  # label only visible cells: 361 numbers would be unreadable
        ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save_figure(fig, path)


def _plot_iou(pairs: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    n = len(pairs)
    height = 0.8 / max(n, 1)
    inches = 2 + NUM_CLASSES * (0.25 + 0.12 * n)
    fig, ax = plt.subplots(figsize=(9, inches))
    fig.subplots_adjust(left=0.14, right=0.98, bottom=0.6 / inches, top=1 - 0.4 / inches)  # margins in inches
    y = np.arange(NUM_CLASSES)
    for k, pair in enumerate(pairs):
        values = [math.nan if v is None else 100.0 * v for v in pair["iou"].values()]  # nan: no bar drawn
        ax.barh(y - 0.4 + (k + 0.5) * height, values, height=height, label=f"{pair['model']} @ {pair['data']}")
    ax.set_yticks(y, CLASS_NAMES)
    ax.invert_yaxis()  # road on top, in class order
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title("Per-class IoU")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, path)


def _examples_grid(examples: list, panel_width: int = 384) -> Image.Image:
    """One row per example: image | ground truth | prediction, all at one width, with titles on top."""
    rows = []
    for image, gt, pred in examples:
        h, w = gt.shape[:2]
        size = (panel_width, max(1, round(h * panel_width / w)))
        # The image may come at another resolution than its label: show it at the label's geometry.
        img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((w, h), Image.BILINEAR)
        panels = [np.asarray(img.resize(size, Image.BILINEAR))]
        panels += [np.asarray(Image.fromarray(colorize(m)).resize(size, Image.NEAREST)) for m in (gt, pred)]
        rows.append(panels)
    title_h = 20
    width = 3 * panel_width + 2 * GAP
    height = title_h + sum(r[0].shape[0] for r in rows) + GAP * (len(rows) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    top = title_h
    for panels in rows:
        for c, panel in enumerate(panels):
            x = c * (panel_width + GAP)
            canvas[top:top + panel.shape[0], x:x + panel_width] = panel
        top += panels[0].shape[0] + GAP
    grid = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for c, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((c * (panel_width + GAP) + 4, 4), title, fill=(0, 0, 0), font=font)
    return grid


def _write_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic.write_bytes(path, buffer.getvalue())


def _markdown(pairs: list[dict], extra: dict, figures: list[tuple[str, str]]) -> str:
    heads = [f"{_md(p['model'])} @ {_md(p['data'])}" for p in pairs]
    protocols = sorted({p["protocol"] for p in pairs})
    scope = ", ".join(f"{name} ({len(PROTOCOLS[name])} classes: "
                      f"{', '.join(CLASS_NAMES[c] for c in PROTOCOLS[name]) if name != '19' else 'all'})"
                      for name in protocols)
    out = ["# Evaluation report", "", f"Protocol: {scope}. Every IoU comes from the full 19-class confusion matrix; "
           "the mIoU averages the protocol's classes.", "", "## mIoU", "", format_matrix(pairs), "",
           "## Pairs", "", "| model | data | mIoU | pixel acc | mean acc | samples | skipped | model path | data |",
           "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for p in pairs:
        out.append(f"| {_md(p['model'])} | {_md(p['data'])} | {_pct(p['miou'])} | {_pct(p['pixel_accuracy'])} | "
                   f"{_pct(p['mean_accuracy'])} | {p['num_samples']} | {p['skipped']} | "
                   f"`{_md(p['model_path'])}` | `{_md(p['data_spec'])}` |")
    out += ["", "## Per-class IoU", "", "| class | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(pairs)]
    for name in CLASS_NAMES:
        out.append(f"| {name} | " + " | ".join(_pct(p["iou"][name]) for p in pairs) + " |")
    out.append("| **mIoU** | " + " | ".join(_pct(p["miou"]) for p in pairs) + " |")
    if extra:
        out += ["", "## Notes", "", "| key | value |", "|---|---|"]
        out += [f"| {_md(k)} | {_md(v)} |" for k, v in extra.items()]
    out += ["", "## Figures", ""]
    out += [f"### {_md(title)}\n\n![{_md(title)}]({name})\n" for title, name in figures]
    return "\n".join(out).rstrip() + "\n"


def write_report(out_dir: str | Path, results: list[dict], extra: dict | None = None) -> dict:
    """Write report.json, report.md and the PNG figures into `out_dir`; return the report.json dict.

    `results`: one dict per evaluated pair with model, data, model_path, data_spec, confusion (19x19 int64),
    num_samples, skipped and examples (list of (image RGB, gt train ids, pred train ids), may be empty).
    """
    import matplotlib
    matplotlib.use("Agg")  # headless: evaluation runs on servers without a display
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen = set()
    for r in results:
        if (r["model"], r["data"]) in seen:
            raise SegdaError(f"pair {r['model']!r} @ {r['data']!r} appears twice in the results; "
                             f"give each model and dataset a distinct label")
        seen.add((r["model"], r["data"]))
    pairs = [_pair_entry(r) for r in results]
    extra = _plain(dict(extra or {}))
    report = {"pairs": pairs, "class_names": list(CLASS_NAMES), "extra": extra,
              "protocols": {name: [CLASS_NAMES[c] for c in PROTOCOLS[name]] for name in {p["protocol"] for p in pairs}}}

    figures, used = [], set()
    for result, pair in zip(results, pairs):
        stem = f"{sanitize(pair['model'])}_{sanitize(pair['data'])}"
        while stem in used:  # "a/b" and "a-b" sanitise alike: keep both figures rather than overwrite one
            stem += "+"
        used.add(stem)
        title = f"{pair['model']} @ {pair['data']}"
        _plot_confusion(pair, out_dir / f"confusion_{stem}.png")
        figures.append((f"Confusion: {title}", f"confusion_{stem}.png"))
        if result.get("examples"):
            _write_png(_examples_grid(result["examples"]), out_dir / f"examples_{stem}.png")
            figures.append((f"Examples: {title}", f"examples_{stem}.png"))
    if pairs:
        _plot_iou(pairs, out_dir / "iou_per_class.png")
        figures.insert(0, ("Per-class IoU", "iou_per_class.png"))

    atomic.write_json(out_dir / "report.json", report)
    atomic.write_text(out_dir / "report.md", _markdown(pairs, extra, figures))
    return report
