"""Predict masks for image files, and export an adapter merged into its base as a plain transformers model.

    segda predict runs/cs/adapter frame1.png frame2.jpg --out masks/
    segda export runs/cs/adapter --out runs/cs/merged

`predict` uses the same inference options and defaults as `segda evaluate`, so its masks are exactly what
evaluation scores: DIR/<stem>.png (uint8 train ids at the image's resolution) and DIR/<stem>_overlay.png.
`--format cityscapes` writes what the official evaluator (cityscapesScripts' evalPixelLevelSemanticLabeling)
reads instead: DIR/<frame>_labelIds.png of Cityscapes label ids, <frame> being the name without _leftImg8bit.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from segda import atomic
from segda.classes import colorize, train_to_label_id_lut
from segda.data.transforms import DecodeError, decode_image, image_size, resize_image
from segda.evaluate import InferenceOptions, load_any, predict_logits
from segda.log import SegdaError, info
from segda.model import save_model


def _read_rgb(path: Path, max_pixels: int) -> np.ndarray:
    """The image as training and evaluation see it (segda.data.transforms.decode_image: upright, EXIF applied),
    its size checked from the header before anything is decoded."""
    data = path.read_bytes()
    try:
        width, height = image_size(data)
        if width * height > max_pixels:
            raise SegdaError(f"{path} is {width}x{height} pixels, over --max-pixels {max_pixels}: resize it, or raise "
                             "--max-pixels")
        return decode_image(data)
    except DecodeError as err:
        raise SegdaError(f"cannot read image {path}: {err}") from None


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
    assert ok
    atomic.write_bytes(path, buf.tobytes())


@torch.no_grad()
def output_names(images: list[str]) -> dict[Path, str]:
    """A distinct output name per input image: its stem, or, where stems collide (a/frame.png, b/frame.png),
    the stem prefixed with as many parent folders as it takes (a__frame, b__frame). No result overwrites another."""
    paths = [Path(name) for name in images]
    seen = set()
    for path in paths:
        if path.resolve() in seen:
            raise SegdaError(f"{path} is given twice: name each image once")
        seen.add(path.resolve())
    for path in paths:
        if not path.is_file():  # a FIFO would block the read forever, a folder is no image
            raise SegdaError(f"{path} is not a regular image file")
    names = {}
    for path in paths:
        depth = 0
        while depth < len(path.resolve().parts) - 1 and any(
                _name_at(other, depth) == _name_at(path, depth) for other in paths if other != path):
            depth += 1
        names[path] = _name_at(path, depth)
    if len(set(names.values())) != len(names):
        raise SegdaError("two images would get the same output name; rename one of them")
    return names


def _name_at(path: Path, depth: int) -> str:
    """The stem, prefixed with its `depth` nearest parent folders."""
    parents = path.resolve().parts[:-1]
    return "__".join([*parents[len(parents) - depth:], path.stem]) if depth else path.stem


FORMATS = ("train-ids", "cityscapes")


def predict_files(model_path: str, images: list[str], out_dir: str | Path, opts: InferenceOptions, *,
                  base: str | None = None, allow_base_mismatch: bool = False, device: str | None = None,
                  fmt: str = "train-ids") -> list[Path]:
    if fmt not in FORMATS:
        raise SegdaError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_any(model_path, base, allow_base_mismatch).to(device).eval()
    out_dir = Path(out_dir)
    written = []
    names = output_names(images)
    if fmt == "cityscapes":
        _check_cityscapes_output(names, out_dir)
        names = {path: stem.removesuffix("_leftImg8bit") + "_labelIds" for path, stem in names.items()}
    inputs = {p.resolve() for p in names}
    for stem in names.values():
        for target in (out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png"):
            if target.resolve() in inputs:  # the mask must never replace the photo it was predicted from
                raise SegdaError(f"writing {target} would replace an input image: choose another --out")
    for path, stem in names.items():
        rgb = _read_rgb(path, opts.max_pixels)
        shown = resize_image(rgb, opts.eval_size) if opts.mode == "whole" else rgb
        logits = predict_logits(model, [torch.from_numpy(shown)], [rgb.shape[:2]], opts, device)[0]
        mask = logits.argmax(0).to(torch.uint8).cpu().numpy()
        if fmt == "cityscapes":  # label ids only: an overlay would match the evaluator's file search too
            _write_png(out_dir / f"{stem}.png", cv2.LUT(mask, _TO_LABEL_ID))
        else:
            _write_png(out_dir / f"{stem}.png", mask)
            _write_png(out_dir / f"{stem}_overlay.png", (0.5 * rgb + 0.5 * colorize(mask)).astype(np.uint8))
        written.append(out_dir / f"{stem}.png")
    info(f"wrote {len(written)} mask(s) to {out_dir}" + (" (Cityscapes label ids)" if fmt == "cityscapes" else
                                                         " and overlays"))
    return written


_TO_LABEL_ID = train_to_label_id_lut()


def _check_cityscapes_output(names: dict[Path, str], out_dir: Path) -> None:
    """The official evaluator finds each frame's prediction by searching the whole results folder for
    `<city>_<seq>_<frame>*.png` and stops at a second match: one frame name per image, and a folder of ours alone."""
    prefixed = [str(path) for path, stem in names.items() if stem != path.stem]
    if prefixed:
        raise SegdaError(f"--format cityscapes needs one file name per frame, but {prefixed[0]} shares its name with "
                         "another image: predict each split separately")
    ours = {stem.removesuffix("_leftImg8bit") + "_labelIds.png" for stem in names.values()}
    others = sorted(p for p in out_dir.rglob("*.png") if p.name not in ours) if out_dir.is_dir() else []
    if others:
        raise SegdaError(f"{out_dir} already holds other PNGs ({others[0]}, ...): the official evaluator would find "
                         "them too. Use an empty --out for --format cityscapes")


def export_merged(adapter_dir: str, out_dir: str | Path, *, base: str | None = None,
                  allow_base_mismatch: bool = False) -> Path:
    from segda.adapters import is_adapter, load_adapted, merge

    if not is_adapter(adapter_dir):
        raise SegdaError(f"{adapter_dir} is not an adapter folder (no adapter_config.json)")
    merged = merge(load_adapted(adapter_dir, base, allow_base_mismatch=allow_base_mismatch))
    save_model(merged, out_dir)
    info(f"merged model written to {out_dir} (loads with SegformerForSemanticSegmentation.from_pretrained)")
    return Path(out_dir)
