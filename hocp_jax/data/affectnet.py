"""AffectNet (Mollahosseini et al. 2017) from the user's downloaded files.

On-disk format (the official release): ``training.csv`` and ``validation.csv``
with the header
  subDirectory_filePath,face_x,face_y,face_width,face_height,
  facial_landmarks,expression,valence,arousal
and the images under ``Manually_Annotated_Images/<subDirectory_filePath>``.
Expression codes: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust,
6 Anger, 7 Contempt, 8 None, 9 Uncertain, 10 No-Face. Rows with code >= 8
(no emotion class; valence/arousal are then often -2) or with valence/arousal
outside [-1, 1] are dropped. A row off this format (a code outside 0-10, a
non-numeric or non-finite value, an empty face box) is a ValueError naming the
file and line.

Each image is cropped to its face box (face_x, face_y, face_width,
face_height) and resized to ``image_size`` (named configs ``affectnet/s64``, the default, and
``affectnet/s224``). Features:
  image (S, S, 3) uint8; va (2,) float32 (valence, arousal) in [-1, 1];
  label () int, the expression (8 classes).
Splits: the test set of AffectNet is not public, so, as usual, the official
validation set is our ``test``; ``validation`` is the 1/50 of training.csv
whose file path has crc32 % 50 == 0 (fixed); ``train`` the rest.
"""
import dataclasses
import zlib

import numpy as np
import tensorflow_datasets as tfds

from hocp_jax.checks import check_positive_int
from hocp_jax.data import manual

EXPRESSIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust",
               "anger", "contempt")
COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
           "expression", "valence", "arousal")


@dataclasses.dataclass
class AffectNetConfig(tfds.core.BuilderConfig):
    """image_size: S, side of the resized face crop."""
    image_size: int = 64

    def __post_init__(self):
        check_positive_int(self.image_size, "AffectNetConfig image_size")


def split_of_training_row(file_path: str) -> str:
    return "validation" if zlib.crc32(file_path.encode()) % 50 == 0 else "train"


class Affectnet(tfds.core.GeneratorBasedBuilder):
    """AffectNet face crops with valence/arousal and the 8 expressions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # s64: the HO-CP configs here (configs/affectnet.py, configs/afew_va.py); s224: the AVCE
    # supplementary's 224x224 images (configs/avce.py), about 12x the bytes per face.
    BUILDER_CONFIGS = [AffectNetConfig(name="s64"), AffectNetConfig(name="s224", image_size=224)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request AffectNet from http://mohammadmahoor.com/affectnet/ and place in
manual_dir: training.csv, validation.csv and the extracted folder
Manually_Annotated_Images/ (manual_dir/Manually_Annotated_Images/<sub>/<f>.jpg)."""

    def _info(self):
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": manual.image_feature((s, s, 3)),
                "va": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                "label": tfds.features.ClassLabel(names=EXPRESSIONS),
            }),
            supervised_keys=("image", "va"),
            homepage="http://mohammadmahoor.com/affectnet/",
        )

    def _split_generators(self, dl_manager):
        root = manual.manual_root(dl_manager, self)
        train_csv = manual.require(root / "training.csv", self)
        val_csv = manual.require(root / "validation.csv", self)
        images = manual.require(root / "Manually_Annotated_Images", self)
        kept = "no row with expression 0-7 and valence/arousal in [-1, 1]"
        return {
            "train": manual.nonempty(self._generate_examples(train_csv, images, "train"),
                                     "train", train_csv, kept),
            "validation": manual.nonempty(
                self._generate_examples(train_csv, images, "validation"), "validation",
                train_csv, f"{kept} whose subDirectory_filePath has crc32 % 50 == 0"),
            "test": manual.nonempty(self._generate_examples(val_csv, images, None),
                                    "test", val_csv, kept),
        }

    def _generate_examples(self, csv_path, images, split):
        size = self.builder_config.image_size
        seen = {}
        for where, row in manual.csv_rows(csv_path, COLUMNS):
            rel = row["subDirectory_filePath"]
            if split is not None and split_of_training_row(rel) != split:
                continue
            expression = manual.number(row["expression"], "expression", where, 0, 10)
            if expression >= len(EXPRESSIONS):
                continue
            va = np.array([manual.number(row[k], k, where) for k in ("valence", "arousal")],
                          np.float32)
            if np.abs(va).max() > 1:
                continue
            manual.check_unique(seen, rel, where, "subDirectory_filePath")
            x, y, w, h = (manual.number(row[k], k, where) for k in COLUMNS[1:5])
            image = manual.load_rgb(manual.require(images / rel, self))
            try:
                face = manual.crop_resize(image, (x, y, x + w, y + h), size)
            except ValueError as err:
                raise manual.invalid(where, f"face_x, face_y, face_width, face_height = "
                                            f"{x:g}, {y:g}, {w:g}, {h:g}: {err}") from None
            yield rel, {"image": face, "va": va, "label": expression}
