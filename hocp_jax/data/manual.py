"""Helpers shared by the builders that read a user's manually downloaded files."""
import csv
import io
import math

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from hocp_jax.checks import check_positive_int


def manual_root(dl_manager, builder) -> epath.Path:
    """The manual_dir of a build, or FileNotFoundError naming it + instructions."""
    try:
        return dl_manager.manual_dir
    except AssertionError as err:
        raise FileNotFoundError(
            f"{builder.name}: manually downloaded files not found ({err}). Give their folder "
            "(train.py: --config.data.manual_dir=<folder>; pipeline.build: manual_dir=<folder>; "
            "default <data_dir>/downloads/manual)."
        ) from None


def require(path: epath.Path, builder) -> epath.Path:
    """Returns `path` if it exists, else FileNotFoundError naming it."""
    if not path.exists():
        raise FileNotFoundError(
            f"{builder.name}: expected {path} (not found). "
            f"Instructions:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return path


def load_rgb(path: epath.Path) -> Image.Image:
    with path.open("rb") as f:
        return Image.open(f).convert("RGB")


def invalid(where: str, message) -> ValueError:
    """The ValueError for bad content of a downloaded file: ``where`` names the file and the row
    or frame (``"<path> line 7"``), ``message`` the field, its value and what was expected."""
    return ValueError(f"{where}: {message}")


def number(text, field: str, where: str, low: int | None = None, high: int | None = None):
    """A CSV field as an int in [low, high] (bounds given) or else a finite float; otherwise
    :func:`invalid` naming the field, its text and what was expected."""
    try:
        value = float(text) if low is None else int(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and (low is None or low <= value <= high)):
        expected = "a finite number" if low is None else f"an integer in [{low}, {high}]"
        raise invalid(where, f"{field}={text!r}, expected {expected}")
    return value


def open_text(path: epath.Path):
    """``path`` opened as UTF-8 text for the csv module, a leading BOM dropped (epath's
    ``open`` ignores ``encoding=``)."""
    return io.TextIOWrapper(path.open("rb"), encoding="utf-8-sig", newline="")


def csv_rows(path: epath.Path, columns):
    """``(where, row)`` for each row of a CSV file with a header (a UTF-8 BOM is accepted):
    ``where`` is ``"<path> line <n>"``, ``row`` a dict by (stripped) column name. A ValueError
    naming the file if a column of ``columns`` is missing, or naming the line of a short row."""
    with open_text(path) as f:
        reader = csv.DictReader(f)
        names = [name.strip() for name in reader.fieldnames or ()]
        if missing := [c for c in columns if c not in names]:
            raise ValueError(f"{path}: header {names}, expected the columns {list(columns)} "
                             f"(missing {missing})")
        reader.fieldnames = names
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row.values():
                raise invalid(where, f"{sum(v is not None for v in row.values())} fields, "
                                     f"expected {len(names)} ({','.join(names)})")
            yield where, row


def check_unique(seen: dict, key, where: str, what: str) -> None:
    """Records where ``key`` was read; a ValueError naming it and both places if it was already
    seen (TFDS would stop on the duplicate example key with an unrelated error)."""
    if key in seen:
        raise ValueError(f"{what} {key!r} appears twice: {seen[key]} and {where}")
    seen[key] = where


def nonempty(examples, split: str, source, reason: str):
    """Yields ``examples``; a ValueError naming the split, its source and ``reason`` if there were
    none (TFDS's own error is an AssertionError "No examples were yielded")."""
    count = 0
    for count, example in enumerate(examples, 1):
        yield example
    if not count:
        raise ValueError(f"split {split!r}: no examples from {source} ({reason})")


def crop_resize(image: Image.Image, box, size: int) -> np.ndarray:
    """Crops box (left, top, right, bottom), rounded to pixels, zero-padded outside the image,
    resizes to (size, size) bilinearly -> uint8 (size, size, C). ValueError for an image that is
    not an 8-bit PIL image (mode L, RGB or RGBA), or a box that is not 4 finite numbers, is
    empty or does not overlap the image."""
    if not isinstance(image, Image.Image) or image.mode not in ("L", "RGB", "RGBA"):
        got = f"mode {image.mode!r}" if isinstance(image, Image.Image) else type(image).__name__
        raise ValueError(f"image ({got}): expected an 8-bit PIL image of mode 'L', 'RGB' or "
                         "'RGBA' (convert it first)")
    check_positive_int(size, "size")
    try:
        coords = np.asarray(box, float)
    except (TypeError, ValueError):
        coords = np.array([])
    if coords.shape != (4,) or not np.isfinite(coords).all():
        raise ValueError(f"box={box!r}: expected 4 finite numbers (left, top, right, bottom)")
    left, top, right, bottom = (int(round(b)) for b in coords)
    width, height = image.size
    if not (left < min(right, width) and top < min(bottom, height) and right > 0 and bottom > 0):
        raise ValueError(f"box={tuple(coords.tolist())} on a {width}x{height} image: expected a "
                         "non-empty box (left < right, top < bottom) overlapping the image")
    out = image.crop((left, top, right, bottom)).resize((size, size), Image.BILINEAR)
    out = np.asarray(out, dtype=np.uint8)
    return out if out.ndim == 3 else out[..., None]


def square_box(x0, y0, x1, y1, margin: float):
    """Square box around (x0, y0, x1, y1), side = max(w, h) * (1 + 2 margin)."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) * (0.5 + margin)
    return cx - half, cy - half, cx + half, cy + half


def image_feature(shape):
    """uint8 image/video tensor, zlib-compressed on disk (works without TF)."""
    return tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                encoding=tfds.features.Encoding.ZLIB)
