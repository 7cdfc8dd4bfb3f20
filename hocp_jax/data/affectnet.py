"""AffectNet (Mollahosseini et al. 2017) from the user's downloaded files.

On-disk format (the official release): ``training.csv`` and ``validation.csv``
with the header
  subDirectory_filePath,face_x,face_y,face_width,face_height,
  facial_landmarks,expression,valence,arousal
and the images under ``Manually_Annotated_Images/<subDirectory_filePath>``.
Expression codes: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust,
6 Anger, 7 Contempt, 8 None, 9 Uncertain, 10 No-Face. Rows with code >= 8
(no emotion class; valence/arousal are then often -2) or with valence/arousal
outside [-1, 1] are dropped.

Each image is cropped to its face box (face_x, face_y, face_width,
face_height) and resized to ``image_size`` (named configs ``affectnet/s64``, the default, and
``affectnet/s224``). Features:
  image (S, S, 3) uint8; va (2,) float32 (valence, arousal) in [-1, 1];
  label () int, the expression (8 classes).
Splits: the test set of AffectNet is not public, so, as usual, the official
validation set is our ``test``; ``validation`` is the 1/50 of training.csv
whose file path has crc32 % 50 == 0 (fixed); ``train`` the rest.
"""
import csv
import dataclasses
import zlib

import numpy as np
import tensorflow_datasets as tfds

from hocp_jax.data import manual

EXPRESSIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust",
               "anger", "contempt")


@dataclasses.dataclass
class AffectNetConfig(tfds.core.BuilderConfig):
    """image_size: S, side of the resized face crop."""
    image_size: int = 64


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
        return {
            "train": self._generate_examples(train_csv, images, "train"),
            "validation": self._generate_examples(train_csv, images, "validation"),
            "test": self._generate_examples(val_csv, images, None),
        }

    def _generate_examples(self, csv_path, images, split):
        size = self.builder_config.image_size
        with csv_path.open() as f:
            for row in csv.DictReader(f):
                rel = row["subDirectory_filePath"]
                if split is not None and split_of_training_row(rel) != split:
                    continue
                expression = int(row["expression"])
                va = np.array([row["valence"], row["arousal"]], np.float32)
                if expression >= len(EXPRESSIONS) or np.abs(va).max() > 1:
                    continue
                x, y, w, h = (float(row[k]) for k in
                              ("face_x", "face_y", "face_width", "face_height"))
                image = manual.load_rgb(manual.require(images / rel, self))
                yield rel, {"image": manual.crop_resize(image, (x, y, x + w, y + h), size),
                            "va": va, "label": expression}
