"""Embedded default datasets, built offline from scikit-learn's bundled digits.

Two small TFDS datasets stand in for the affect data of the paper (AffectNet
images, AFEW-VA videos) so the main job runs with no download. Both are made
from ``sklearn.datasets.load_digits`` (1797 8x8 digits, values 0..16):

Rendering. A digit is upsampled x2 (16x16) with bilinear interpolation and
drawn on a black 32x32 canvas with its top-left corner at a real-valued
position (x, y), x, y in [0, 16] (sub-pixel positions by the same
interpolation), stored as uint8 (0..255), one channel.

``digits_affect`` (static images, the "AffectNet" stand-in)
  image (32, 32, 1) uint8; label () int, the digit class (10 classes, the
  emotion-class stand-in); va (2,) float32 in [-1, 1]:
    valence = VALENCE[label]      fixed map digit -> value, linspace(-1, 1, 10)
    arousal = (x - 8) / 8         horizontal position of the digit
  y is a uniform nuisance. Both targets are readable from the single image.

``moving_digits`` (videos, the "AFEW-VA" stand-in)
  video (8, 32, 32, 1) uint8; label () int; va (8, 2) float32 in [-1, 1],
  per frame. Each clip moves one digit horizontally along
    x(t) = x0 + v0 t + (v1 - v0) t^2 / (2 (T - 1)),  t = 0..T-1,
  i.e. with velocity v(t) = x'(t) changing linearly from v0 to v1, both
  uniform in [-VMAX, VMAX] (VMAX = 2 px/frame); x0 is uniform among the
  starts that keep the digit inside the canvas, y is a constant nuisance.
    valence_t = VALENCE[label]    (readable from any single frame)
    arousal_t = v(t) / VMAX       (signed horizontal speed)
  Arousal needs time: a frame only shows x(t), and the same frame (digit,
  position) occurs with any speed. It is the time derivative of the static
  arousal (position), ``arousal_t = 4 * d/dt static_arousal(x(t))``, so a
  static model whose features encode position transfers: temporal factors
  only have to learn a finite difference across frames. The frames have the
  same distribution as the static images.

Splits. The 1797 source digits are split once (fixed permutation, 60/20/20%)
into disjoint pools, so test digits are unseen handwriting; each split then
draws its examples from its own pool with a fixed seed. Sizes: digits_affect
1500/300/300, moving_digits 600/150/150 (train/validation/test). Building
both takes a few seconds.
"""
import numpy as np
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from hocp_jax.checks import check_int, is_int

CANVAS = 32       # output height = width
SCALE = 2         # digit upsampling factor: 8x8 -> 16x16
MAX_OFFSET = CANVAS - 8 * SCALE   # top-left corner range [0, MAX_OFFSET]
NUM_FRAMES = 8
VMAX = 2.0        # px/frame, speed that maps to arousal +-1
VALENCE = np.linspace(-1.0, 1.0, 10).astype(np.float32)
SPLITS = ("train", "validation", "test")
SIZES = {
    "digits_affect": {"train": 1500, "validation": 300, "test": 300},
    "moving_digits": {"train": 600, "validation": 150, "test": 150},
}
_SEEDS = {"digits_affect": 1, "moving_digits": 2}


def digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The source digits of one split: images (N, 8, 8) in [0, 1], labels (N,)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val),
              "test": (n_train + n_val, len(order))}
    lo, hi = bounds[split]
    idx = order[lo:hi]
    return digits.images[idx] / 16.0, digits.target[idx]


def _interp_matrix(offset: np.ndarray) -> np.ndarray:
    """Bilinear weights (..., CANVAS, 8): canvas pixel <- digit pixel at `offset`."""
    centre = (np.arange(CANVAS) + 0.5 - np.asarray(offset)[..., None]) / SCALE - 0.5
    return np.maximum(0.0, 1.0 - np.abs(centre[..., None] - np.arange(8)))


def render(digit: np.ndarray, x, y) -> np.ndarray:
    """Draws digit (8, 8) in [0, 1] at top-left (x, y) -> uint8 (..., 32, 32, 1).

    x, y: scalars or arrays of the same shape (e.g. (T,) for a clip).
    """
    x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    img = _interp_matrix(y) @ digit @ np.swapaxes(_interp_matrix(x), -1, -2)
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)[..., None]


def trajectory(x0: float, v0: float, v1: float, num_frames: int = NUM_FRAMES):
    """Positions x(t) and velocities v(t), t = 0..num_frames-1 (see module doc)."""
    if not (is_int(num_frames) and num_frames >= 2):  # the speed changes over num_frames - 1 steps
        raise ValueError(f"num_frames={num_frames!r}: expected an int >= 2")
    t = np.arange(num_frames, dtype=float)
    x = x0 + v0 * t + (v1 - v0) * t**2 / (2 * (num_frames - 1))
    v = v0 + (v1 - v0) * t / (num_frames - 1)
    return x, v


def make_digits_affect(split: str, num_examples: int | None = None) -> dict:
    """All examples of a digits_affect split as numpy arrays.

    Returns {"image": (N, 32, 32, 1) uint8, "va": (N, 2) float32,
    "label": (N,) int64}; deterministic.
    """
    digits, labels = digit_pool(split)
    n = SIZES["digits_affect"][split] if num_examples is None else check_int(num_examples, "num_examples", 0)
    rng = np.random.default_rng([_SEEDS["digits_affect"], SPLITS.index(split)])
    pick = rng.integers(0, len(labels), n)
    x, y = rng.uniform(0, MAX_OFFSET, (2, n))
    image = np.stack([render(digits[i], xi, yi) for i, xi, yi in zip(pick, x, y)])
    label = labels[pick]
    arousal = (x - MAX_OFFSET / 2) / (MAX_OFFSET / 2)
    va = np.stack([VALENCE[label], arousal], -1).astype(np.float32)
    return {"image": image, "va": va, "label": label.astype(np.int64)}


def make_moving_digits(split: str, num_examples: int | None = None) -> dict:
    """All clips of a moving_digits split as numpy arrays.

    Returns {"video": (N, 8, 32, 32, 1) uint8, "va": (N, 8, 2) float32,
    "label": (N,) int64}; deterministic.
    """
    digits, labels = digit_pool(split)
    n = SIZES["moving_digits"][split] if num_examples is None else check_int(num_examples, "num_examples", 0)
    rng = np.random.default_rng([_SEEDS["moving_digits"], SPLITS.index(split)])
    pick = rng.integers(0, len(labels), n)
    videos, arousal = [], []
    for i in pick:
        v0, v1 = rng.uniform(-VMAX, VMAX, 2)
        path, vel = trajectory(0.0, v0, v1)
        x0 = rng.uniform(-path.min(), MAX_OFFSET - path.max())
        videos.append(render(digits[i], x0 + path, rng.uniform(0, MAX_OFFSET)))
        arousal.append(vel / VMAX)
    label = labels[pick]
    valence = np.broadcast_to(VALENCE[label][:, None], (n, NUM_FRAMES))
    va = np.stack([valence, np.asarray(arousal)], -1).astype(np.float32)
    return {"video": np.stack(videos), "va": va, "label": label.astype(np.int64)}


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common part: 3 splits generated by a numpy function, no download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    _make = None  # numpy split generator

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        arrays = type(self)._make(split)
        for i in range(len(arrays["label"])):
            yield i, {k: v[i] for k, v in arrays.items()}


class DigitsAffect(_EmbeddedBuilder):
    """Static digit images with valence (identity) and arousal (position)."""

    _make = staticmethod(make_digits_affect)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(CANVAS, CANVAS, 1), dtype=np.uint8),
                "va": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "va"),
        )


class MovingDigits(_EmbeddedBuilder):
    """Digit videos with per-frame valence (identity) and arousal (speed)."""

    _make = staticmethod(make_moving_digits)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(
                    shape=(NUM_FRAMES, CANVAS, CANVAS, 1), dtype=np.uint8),
                "va": tfds.features.Tensor(shape=(NUM_FRAMES, 2), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("video", "va"),
        )
