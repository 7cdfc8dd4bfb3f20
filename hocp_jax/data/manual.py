"""Helpers shared by the builders that read a user's manually downloaded files."""
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image


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


def crop_resize(image: Image.Image, box, size: int) -> np.ndarray:
    """Crops box (left, top, right, bottom), zero-padded outside the image,
    resizes to (size, size) bilinearly -> uint8 (size, size, C)."""
    box = tuple(int(round(b)) for b in box)
    out = image.crop(box).resize((size, size), Image.BILINEAR)
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
