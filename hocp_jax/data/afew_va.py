"""AFEW-VA (Kossaifi et al. 2017) from the user's downloaded files, as clips.

On-disk format (the official release, unzipped): one folder per video,
``001/`` ... ``600/`` (possibly inside the archive folders ``01/`` ...),
holding the frames ``00000.png``, ``00001.png``, ... and ``<id>.json``:
  {"video_id": "001", "frames": {"00000": {"valence": v, "arousal": a,
   "landmarks": [[x, y], ... 68 points]}, ...}}
with valence/arousal integers on [-10, 10]. Frames are ordered by number; an
annotation off this format (or a face box off the image) is a ValueError
naming the file and frame.

Examples are clips of ``num_frames`` consecutive frames (windows every
``stride`` frames; a video shorter than ``num_frames`` gives none). Each frame
is cropped to a square around its 68 landmarks (enlarged by ``margin`` on each
side; frames without landmarks use the video's median box) and resized to
``image_size``. Features:
  video (T, S, S, 3) uint8; va (T, 2) float32 = (valence, arousal) / 10 in
  [-1, 1]; clip_id () int32 (the video number); start_frame () int32.
Splits (AFEW-VA has no official split; fixed, by video number n):
  train n % 10 in 0..6, validation n % 10 == 7, test n % 10 in {8, 9}.
"""
import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds

from hocp_jax.checks import check_positive_int, check_real, is_number
from hocp_jax.data import manual


@dataclasses.dataclass
class AfewVaConfig(tfds.core.BuilderConfig):
    """num_frames: T per clip; stride: frames between clip starts;
    image_size: S; margin: face-box enlargement per side (fraction)."""
    num_frames: int = 8
    stride: int = 8
    image_size: int = 64
    margin: float = 0.25

    def __post_init__(self):
        for field in ("num_frames", "stride", "image_size"):
            check_positive_int(getattr(self, field), f"AfewVaConfig {field}")
        check_real(self.margin, "AfewVaConfig margin", lambda v: 0 <= v < float("inf"), "a finite real number >= 0")


def split_of(video_number: int) -> str:
    r = video_number % 10
    return "train" if r < 7 else "validation" if r == 7 else "test"


class AfewVa(tfds.core.GeneratorBasedBuilder):
    """AFEW-VA clips with per-frame valence/arousal in [-1, 1]."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [AfewVaConfig(name="t8_s64")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request AFEW-VA from https://ibug.doc.ic.ac.uk/resources/afew-va-database/,
unzip all parts into manual_dir so that manual_dir/**/001/001.json and
manual_dir/**/001/00000.png ... exist (one folder per video)."""

    def _info(self):
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "video": manual.image_feature(
                    (c.num_frames, c.image_size, c.image_size, 3)),
                "va": tfds.features.Tensor(shape=(c.num_frames, 2), dtype=np.float32),
                "clip_id": tfds.features.Tensor(shape=(), dtype=np.int32),
                "start_frame": tfds.features.Tensor(shape=(), dtype=np.int32),
            }),
            supervised_keys=("video", "va"),
            homepage="https://ibug.doc.ic.ac.uk/resources/afew-va-database/",
        )

    def _split_generators(self, dl_manager):
        root = manual.manual_root(dl_manager, self)
        annotations = sorted(p for pattern in ("*/*.json", "*/*/*.json")
                             for p in root.glob(pattern) if p.stem == p.parent.name)
        if not annotations:
            manual.require(root / "001" / "001.json", self)
        by_split, seen = {"train": [], "validation": [], "test": []}, {}
        for path in annotations:
            if not path.stem.isdigit():
                raise ValueError(f"{path}: folder {path.stem!r} is not a video number, expected "
                                 "<n>/<n>.json with n = 001, 002, ...")
            manual.check_unique(seen, int(path.stem), path, "video number")
            by_split[split_of(int(path.stem))].append(path)
        num_frames = self.builder_config.num_frames
        return {s: manual.nonempty(
                    self._generate_examples(paths), s, root,
                    f"each of its {len(paths)} videos is shorter than num_frames={num_frames}"
                    if paths else "no video of this split (by video number, see split_of)")
                for s, paths in by_split.items()}

    def _generate_examples(self, paths):
        c = self.builder_config
        for path in paths:
            keys, va, boxes = _read_annotations(path, c.margin)
            for start in range(0, len(keys) - c.num_frames + 1, c.stride):
                window = range(start, start + c.num_frames)
                video = np.stack([_face(path, keys[i], boxes[i], c.image_size, self)
                                  for i in window])
                yield f"{path.stem}_{start:05d}", {
                    "video": video, "va": va[start:start + c.num_frames],
                    "clip_id": np.int32(int(path.stem)), "start_frame": np.int32(int(keys[start]))}


def _read_annotations(path, margin):
    """(frame keys in numeric order, va (n, 2) float32 / 10, face boxes) of one <id>.json;
    ValueError naming the file (and frame) for content off the format."""
    try:
        doc = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    frames = doc.get("frames") if isinstance(doc, dict) else None
    if not (isinstance(frames, dict) and all(k.isdigit() for k in frames)):
        raise ValueError(f'{path}: expected {{"frames": {{"00000": {{"valence": v, "arousal": a, '
                         f'"landmarks": [[x, y], ...]}}, ...}}}}, frames named by number')
    keys = sorted(frames, key=int)
    va, boxes = [], []
    for key in keys:
        where, frame = f"{path} frame {key!r}", frames[key]
        got = [frame.get("valence"), frame.get("arousal")] if isinstance(frame, dict) else frame
        if not (isinstance(frame, dict) and all(is_number(v) and -10 <= v <= 10 for v in got)):
            raise manual.invalid(where, f"valence, arousal = {got!r}, expected numbers in [-10, 10]")
        va.append(got)
        boxes.append(_landmark_box(frame.get("landmarks"), margin, where))
    valid = [b for b in boxes if b is not None]
    if not valid:
        raise ValueError(f"{path}: no frame has landmarks")
    median = tuple(np.median(np.asarray(valid), axis=0))
    return keys, np.array(va, np.float32) / 10.0, [median if b is None else b for b in boxes]


def _landmark_box(landmarks, margin, where):
    if not landmarks:
        return None
    try:
        pts = np.asarray(landmarks, float)
    except (TypeError, ValueError):  # ragged, or not numbers
        pts = np.array([])
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise manual.invalid(where, "landmarks: expected a list of [x, y] points")
    return manual.square_box(*pts.min(0), *pts.max(0), margin)


def _face(path, key, box, size, builder):
    """Frame ``key`` of the video of ``path`` cropped to ``box`` and resized."""
    image = manual.load_rgb(_frame_path(path.parent, key, builder))
    try:
        return manual.crop_resize(image, box, size)
    except ValueError as err:
        raise manual.invalid(f"{path} frame {key!r}", f"face box of the landmarks: {err}") from None


def _frame_path(folder, key, builder):
    for ext in (".png", ".jpg"):
        if (folder / (key + ext)).exists():
            return folder / (key + ext)
    return manual.require(folder / (key + ".png"), builder)
