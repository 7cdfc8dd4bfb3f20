"""Jester builder on a tiny fixture written here in the real on-disk format:
<manual>/20bn-jester-v1/<id>/00001.jpg ..., jester-v1-{labels,train,validation,test}.csv."""
import numpy as np
import pytest
from PIL import Image

from hocp_jax.data import jester, pipeline

# video id -> (split, label name, number of frames, frame width); frames are 24 px high
VIDEOS = {7: ("train", "Thumb Up", 25, 40), 12: ("train", "No gesture", 5, 56),
          30: ("validation", "Swiping Left", 18, 24)}
TEST_ONLY_ID = 41
HEIGHT = 24
BORDER = (255, 255, 255)  # left/right of the centre square: must be cropped away


def _colour(video_id, k):
    """Flat colour of frame k (0-based) of a video: R encodes k, G the video."""
    return (10 * k + 5, 3 * video_id, 128)


def _write_video(frames_dir, video_id, num_frames, width):
    folder = frames_dir / str(video_id)
    folder.mkdir(parents=True)
    pad = (width - HEIGHT) // 2  # 8-px multiples: JPEG blocks never straddle an edge
    for k in range(num_frames):
        img = np.empty((HEIGHT, width, 3), np.uint8)
        img[:] = BORDER
        img[:, pad:pad + HEIGHT] = _colour(video_id, k)
        Image.fromarray(img).save(folder / f"{k + 1:05d}.jpg", quality=95, subsampling=0)


def _write_manual(root):
    frames_dir = root / "20bn-jester-v1"
    for video_id, (_, _, n, width) in VIDEOS.items():
        _write_video(frames_dir, video_id, n, width)
    _write_video(frames_dir, TEST_ONLY_ID, 3, 40)
    # label order reversed on purpose: labels are matched by name
    (root / "jester-v1-labels.csv").write_text("\n".join(reversed(jester.LABELS)) + "\n")
    for split in ("train", "validation"):
        rows = [f"{i};{label}" for i, (s, label, _, _) in VIDEOS.items() if s == split]
        (root / f"jester-v1-{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "jester-v1-test.csv").write_text(f"{TEST_ONLY_ID}\n")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jester")
    manual_dir = _write_manual(tmp / "manual")
    return pipeline.build("jester", tmp / "tfds", manual_dir=manual_dir), tmp


def test_frame_indices_rule():
    # n >= T: centres of T equal segments, floor((2i + 1) n / (2T))
    np.testing.assert_array_equal(
        jester.frame_indices(25, 18),
        [0, 2, 3, 4, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 20, 21, 22, 24])
    np.testing.assert_array_equal(jester.frame_indices(36, 4), [4, 13, 22, 31])
    np.testing.assert_array_equal(jester.frame_indices(18, 18), np.arange(18))
    # n < T: every frame, then the last one repeated
    np.testing.assert_array_equal(jester.frame_indices(3, 6), [0, 1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="num_available=0"):
        jester.frame_indices(0, 18)
    with pytest.raises(ValueError, match="num_frames=0"):  # was: silently no frame
        jester.frame_indices(5, 0)


def test_config_validation():
    with pytest.raises(ValueError, match="num_frames=0"):
        jester.JesterConfig(name="bad", num_frames=0)
    with pytest.raises(ValueError, match="image_size=-84"):
        jester.JesterConfig(name="bad", image_size=-84)


def test_builder_on_fixture_default_config(built):
    builder, _ = built
    assert builder.builder_config.name == "t18_s84"
    assert set(builder.info.splits) == {"train", "validation"}  # no unlabelled test split
    label_names = builder.info.features["label"]
    assert label_names.num_classes == 27
    expected_frames = {  # written-out sampling of 18 frames from n
        25: [0, 2, 3, 4, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 20, 21, 22, 24],
        5: [0, 1, 2, 3, 4] + [4] * 13,
        18: list(range(18))}
    seen = set()
    for split in ("train", "validation"):
        source = builder.as_data_source(split=split)
        assert len(source) == sum(v[0] == split for v in VIDEOS.values())
        for i in range(len(source)):
            e = source[i]
            video_id = int(e["video_id"])
            want_split, name, n, _ = VIDEOS[video_id]
            seen.add(video_id)
            assert want_split == split
            assert label_names.int2str(int(e["label"])) == name
            video = e["video"]
            assert video.shape == (18, 84, 84, 3) and video.dtype == np.uint8
            want = np.array([_colour(video_id, k) for k in expected_frames[n]], float)
            # every pixel is the centre square's colour: the white borders are cropped
            err = np.abs(video.astype(float) - want[:, None, None, :])
            assert err.max() <= 6, err.max()
    assert seen == set(VIDEOS)


def test_pipeline_batches_and_determinism(built):
    _, tmp = built
    data_dir = tmp / "tfds"
    batch = next(pipeline.eval_batches("jester", "validation", data_dir, batch_size=2,
                                       shard_index=0, shard_count=1))
    assert batch["video"].shape == (2, 18, 84, 84, 3) and batch["video"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["video_id"].tolist() == [30, 30]
    np.testing.assert_array_equal(batch["mask"], [1, 0])
    kw = dict(batch_size=2, seed=5, shard_index=0, shard_count=1)
    a, b = (pipeline.train_iterator("jester", "train", data_dir, **kw) for _ in range(2))
    a, b = [next(a) for _ in range(3)], [next(b) for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert sorted(a[0]["video_id"].tolist()) == [7, 12]


def test_small_config(tmp_path):
    manual_dir = _write_manual(tmp_path / "manual")
    config = jester.JesterConfig(name="t4_s8", num_frames=4, image_size=8)
    builder = pipeline.build("jester", tmp_path / "tfds", manual_dir=manual_dir, config=config)
    by_id = {int(e["video_id"]): e for e in builder.as_data_source(split="train")}
    assert by_id[7]["video"].shape == (4, 8, 8, 3)
    frames = np.round((by_id[7]["video"][..., 0].mean((1, 2)) - 5) / 10)
    np.testing.assert_array_equal(frames, [3, 9, 15, 21])  # floor((2i+1) 25 / 8)


def test_missing_files_name_the_expected_path(tmp_path):
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    (manual_dir / "jester-v1-train.csv").write_text("1;Thumb Up\n")  # not empty, incomplete
    data_dir = tmp_path / "tfds"
    with pytest.raises(FileNotFoundError, match=str(manual_dir / "20bn-jester-v1")):
        pipeline.build("jester", data_dir, manual_dir=manual_dir)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        pipeline.build("jester", data_dir, manual_dir=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        pipeline.data_source("jester", "train", data_dir)
    _write_manual(manual_dir)
    for name in ("jester-v1-labels.csv", "jester-v1-validation.csv"):
        (manual_dir / name).rename(tmp_path / name)
        with pytest.raises(FileNotFoundError, match=str(manual_dir / name)):
            pipeline.build("jester", data_dir, manual_dir=manual_dir)
        (tmp_path / name).rename(manual_dir / name)
    with open(manual_dir / "jester-v1-validation.csv", "a") as f:
        f.write("4242;Stop Sign\n")  # listed, but its frame folder is missing
    with pytest.raises(FileNotFoundError, match=str(manual_dir / "20bn-jester-v1" / "4242")):
        pipeline.build("jester", data_dir, manual_dir=manual_dir)


def test_unknown_label_is_a_clear_error(tmp_path):
    manual_dir = _write_manual(tmp_path / "manual")
    (manual_dir / "jester-v1-train.csv").write_text("7;Waving Hello\n")
    with pytest.raises(ValueError, match="Waving Hello"):
        pipeline.build("jester", tmp_path / "tfds", manual_dir=manual_dir)


@pytest.mark.parametrize("edit,words", [
    # were: TFDS's "No module named 'tensorflow'" (duplicate key) and AssertionError (empty split)
    (lambda m: (m / "jester-v1-train.csv").write_text((m / "jester-v1-train.csv").read_text() + "7;Thumb Up\n"),
     r"video_id '7' appears twice: .*jester-v1-train.csv line 1 and .*jester-v1-train.csv line 3"),
    (lambda m: (m / "jester-v1-validation.csv").write_text(""),
     r"split 'validation': no examples from .*jester-v1-validation.csv"),
])
def test_invalid_lists_are_clear_errors(tmp_path, edit, words):
    manual_dir = _write_manual(tmp_path / "manual")
    edit(manual_dir)
    config = jester.JesterConfig(name="t2_s8", num_frames=2, image_size=8)
    with pytest.raises(ValueError, match=words):
        pipeline.build("jester", tmp_path / "tfds", manual_dir=manual_dir, config=config)


def test_lists_with_utf8_bom(tmp_path):  # as saved by Excel; was: line 1 refused
    manual_dir = _write_manual(tmp_path / "manual")
    for name in ("jester-v1-labels.csv", "jester-v1-train.csv"):
        (manual_dir / name).write_bytes(b"\xef\xbb\xbf" + (manual_dir / name).read_bytes())
    config = jester.JesterConfig(name="t2_s8", num_frames=2, image_size=8)
    builder = pipeline.build("jester", tmp_path / "tfds", manual_dir=manual_dir, config=config)
    assert sorted(int(e["video_id"]) for e in builder.as_data_source(split="train")) == [7, 12]
