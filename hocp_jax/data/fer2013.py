"""FER2013 (Goodfellow et al. 2013) from the Kaggle ``fer2013.csv``.

On-disk format: ``fer2013.csv`` (in manual_dir or manual_dir/fer2013/) with
columns ``emotion`` (0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise,
6 Neutral), ``pixels`` (48*48 space-separated gray values, row-major) and
``Usage`` (Training / PublicTest / PrivateTest -> train / validation / test).
Features: image (48, 48, 1) uint8; label () int (7 classes). No
valence/arousal. A row off this format is a ValueError naming the file and line.
"""
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
        return {split: manual.nonempty(self._generate_examples(path, split), split, path,
                                       f"no row with Usage={usage}")
                for usage, split in USAGE_TO_SPLIT.items()}

    def _generate_examples(self, path, split):
        for i, (where, row) in enumerate(manual.csv_rows(path, ("emotion", "pixels", "Usage"))):
            usage = row["Usage"].strip()
            if usage not in USAGE_TO_SPLIT:
                raise manual.invalid(where, f"Usage={usage!r}, expected one of {list(USAGE_TO_SPLIT)}")
            if USAGE_TO_SPLIT[usage] != split:
                continue
            label = manual.number(row["emotion"], "emotion", where, 0, len(EMOTIONS) - 1)
            words = row["pixels"].split()
            try:
                pixels = np.array(words, np.int64)
            except ValueError:  # not integers
                pixels = np.array([-1])
            if pixels.size != SIDE * SIDE or pixels.min() < 0 or pixels.max() > 255:
                bad = next((f" (one is {w!r})" for w in words if not (w.isdigit() and int(w) <= 255)), "")
                raise manual.invalid(where, f"pixels: {len(words)} values{bad}, expected "
                                            f"{SIDE * SIDE} integers in [0, 255]")
            yield i, {"image": pixels.astype(np.uint8).reshape(SIDE, SIDE, 1), "label": label}
