"""FER2013 (Goodfellow et al. 2013) from the Kaggle ``fer2013.csv``.

On-disk format: ``fer2013.csv`` (in manual_dir or manual_dir/fer2013/) with
columns ``emotion`` (0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise,
6 Neutral), ``pixels`` (48*48 space-separated gray values, row-major) and
``Usage`` (Training / PublicTest / PrivateTest -> train / validation / test).
Features: image (48, 48, 1) uint8; label () int (7 classes). No
valence/arousal.
"""
import csv

import numpy as np
import tensorflow_datasets as tfds

from hocp_jax.data import manual

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}
SIDE = 48


class Fer2013(tfds.core.GeneratorBasedBuilder):
    """FER2013 48x48 grayscale faces with 7 emotion classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download fer2013.csv from
https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge/data
and place it at manual_dir/fer2013.csv (or manual_dir/fer2013/fer2013.csv)."""

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": manual.image_feature((SIDE, SIDE, 1)),
                "label": tfds.features.ClassLabel(names=EMOTIONS),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        root = manual.manual_root(dl_manager, self)
        path = root / "fer2013" / "fer2013.csv"
        if not path.exists():
            path = manual.require(root / "fer2013.csv", self)
        return {s: self._generate_examples(path, s) for s in USAGE_TO_SPLIT.values()}

    def _generate_examples(self, path, split):
        with path.open() as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
            for i, row in enumerate(reader):
                if USAGE_TO_SPLIT[row["Usage"].strip()] != split:
                    continue
                pixels = np.array(row["pixels"].split(), np.uint8)
                if pixels.size != SIDE * SIDE:
                    raise ValueError(f"{path} row {i}: {pixels.size} pixels, "
                                     f"expected {SIDE * SIDE}")
                yield i, {"image": pixels.reshape(SIDE, SIDE, 1),
                          "label": int(row["emotion"])}
