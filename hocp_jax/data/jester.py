"""20BN-Jester v1 (Materzynska et al. 2019) from the user's downloaded files.

On-disk format (the official release, extracted) in manual_dir:
  20bn-jester-v1/<video_id>/00001.jpg, 00002.jpg, ...   JPEG frames, 12 fps,
                                  100 px high, variable width (mostly 176)
  jester-v1-labels.csv       the 27 label names, one per line
  jester-v1-train.csv        lines ``<video_id>;<Label Name>`` (118,562)
  jester-v1-validation.csv   lines ``<video_id>;<Label Name>`` (14,787)
  jester-v1-test.csv         ids only (labels not public): not used.
A line off this format, or a video_id listed twice in a file, is a ValueError
naming the file and line.

Each video becomes one example of ``num_frames`` frames (the paper, supp.
Sec. 7: 18 frames of 84x84). Frame sampling, for a video of n frames (sorted
by file name) and T = num_frames:
  n >= T: frame floor((2 i + 1) n / (2 T)) for i = 0..T-1, the centre of the
          i-th of T equal segments of the clip (n == T keeps every frame);
  n <  T: all n frames, then the last one repeated up to T.
Each frame is centre-cropped to a square (side = its shorter side) and
resized bilinearly to ``image_size`` -- i.e. shorter side resized to S, then
a centre crop of S x S (the left/right borders of the wide frames are lost).
Features:
  video (T, S, S, 3) uint8; label () int, 27 classes in the order of LABELS
  (the order of the official jester-v1-labels.csv; rows are matched by name,
  case-insensitively); video_id () int32.
Splits: ``train`` and ``validation`` (the official ones). Jester's test labels
are not public, so there is no ``test`` split; as in the paper, results are
reported on ``validation``.
"""
import csv
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from hocp_jax.checks import check_positive_int
from hocp_jax.data import manual

LABELS = (
    "Swiping Left", "Swiping Right", "Swiping Down", "Swiping Up",
    "Pushing Hand Away", "Pulling Hand In",
    "Sliding Two Fingers Left", "Sliding Two Fingers Right",
    "Sliding Two Fingers Down", "Sliding Two Fingers Up",
    "Pushing Two Fingers Away", "Pulling Two Fingers In",
    "Rolling Hand Forward", "Rolling Hand Backward",
    "Turning Hand Clockwise", "Turning Hand Counterclockwise",
    "Zooming In With Full Hand", "Zooming Out With Full Hand",
    "Zooming In With Two Fingers", "Zooming Out With Two Fingers",
    "Thumb Up", "Thumb Down", "Shaking Hand", "Stop Sign", "Drumming Fingers",
    "No gesture", "Doing other things",
)
FRAMES_DIR = "20bn-jester-v1"
LABELS_CSV = "jester-v1-labels.csv"
SPLIT_CSVS = {"train": "jester-v1-train.csv", "validation": "jester-v1-validation.csv"}


@dataclasses.dataclass
class JesterConfig(tfds.core.BuilderConfig):
    """num_frames: T per video (sampled / padded, see module doc);
    image_size: S, side of the square frames."""
    num_frames: int = 18
    image_size: int = 84

    def __post_init__(self):
        for field in ("num_frames", "image_size"):
            check_positive_int(getattr(self, field), f"JesterConfig {field}")


def frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """Indices (num_frames,) of the frames kept from a video of num_available."""
    if num_available < 1:
        raise ValueError(f"num_available={num_available}: expected >= 1 frame")
    check_positive_int(num_frames, "num_frames")
    i = np.arange(num_frames)
    if num_available >= num_frames:
        return (2 * i + 1) * num_available // (2 * num_frames)
    return np.minimum(i, num_available - 1)


def centre_square(width: int, height: int):
    """Box (left, top, right, bottom) of the centred square of side min(w, h)."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


class Jester(tfds.core.GeneratorBasedBuilder):
    """20BN-Jester v1 hand-gesture videos, 27 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [JesterConfig(name="t18_s84")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download 20BN-Jester v1 (https://developer.qualcomm.com/software/ai-datasets/jester,
formerly https://20bn.com/datasets/jester/v1), extract the frame archive and
put in manual_dir: {FRAMES_DIR}/<video_id>/00001.jpg ..., {LABELS_CSV},
{SPLIT_CSVS['train']} and {SPLIT_CSVS['validation']}."""

    def _info(self):
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "video": manual.image_feature(
                    (c.num_frames, c.image_size, c.image_size, 3)),
                "label": tfds.features.ClassLabel(names=LABELS),
                "video_id": tfds.features.Tensor(shape=(), dtype=np.int32),
            }),
            supervised_keys=("video", "label"),
            homepage="https://developer.qualcomm.com/software/ai-datasets/jester",
        )

    def _split_generators(self, dl_manager):
        root = manual.manual_root(dl_manager, self)
        frames = manual.require(root / FRAMES_DIR, self)
        label_of = _label_index(manual.require(root / LABELS_CSV, self))
        csvs = {s: manual.require(root / name, self) for s, name in SPLIT_CSVS.items()}
        return {s: manual.nonempty(self._generate_examples(path, frames, label_of), s, path,
                                   "no '<video_id>;<Label Name>' line")
                for s, path in csvs.items()}

    def _generate_examples(self, csv_path, frames_dir, label_of):
        c = self.builder_config
        seen = {}
        with manual.open_text(csv_path) as f:
            for line, row in enumerate(csv.reader(f, delimiter=";"), 1):
                if not row:
                    continue
                where = f"{csv_path} line {line}"
                if len(row) != 2 or not row[0].strip().isdigit():
                    raise manual.invalid(where, f"{row!r}, expected '<numeric video_id>;<Label Name>'")
                video_id, name = row[0].strip(), row[1].strip()
                if name.casefold() not in label_of:
                    raise manual.invalid(where, f"label {name!r} is not one of the 27 Jester "
                                                f"labels {LABELS}")
                manual.check_unique(seen, video_id, where, "video_id")
                folder = manual.require(frames_dir / video_id, self)
                paths = sorted(folder.glob("*.jpg"))
                if not paths:
                    raise ValueError(f"{folder}: no .jpg frames")
                video = np.stack([
                    _square_frame(paths[k], c.image_size)
                    for k in frame_indices(len(paths), c.num_frames)])
                yield video_id, {"video": video, "label": label_of[name.casefold()],
                                 "video_id": np.int32(int(video_id))}


def _label_index(labels_csv) -> dict:
    """casefolded label name -> index in LABELS; the file must list exactly LABELS."""
    names = [n.strip() for n in labels_csv.read_bytes().decode("utf-8-sig").splitlines() if n.strip()]
    if sorted(n.casefold() for n in names) != sorted(n.casefold() for n in LABELS):
        raise ValueError(f"{labels_csv}: labels {names}, expected the 27 Jester "
                         f"labels {LABELS}")
    return {n.casefold(): i for i, n in enumerate(LABELS)}


def _square_frame(path, size):
    image = manual.load_rgb(path)
    return manual.crop_resize(image, centre_square(*image.size), size)
