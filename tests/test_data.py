"""Datasets and input pipeline: embedded builders, manual builders on fixtures
written here in the real on-disk formats, determinism, resume, sharding."""
import csv
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from hocp_jax.data import embedded, manual, pipeline
from hocp_jax.data.afew_va import AfewVaConfig, split_of
from hocp_jax.data.affectnet import AffectNetConfig, split_of_training_row


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Both embedded datasets built once, offline, into a temp dir."""
    path = tmp_path_factory.mktemp("tfds")
    for name in pipeline.EMBEDDED:
        pipeline.build(name, path)
    return path


def _all(source):
    return [source[i] for i in range(len(source))]


def _com_x(frames):
    """Horizontal centre of mass (pixels) of (..., H, W, 1) images."""
    w = frames[..., 0].astype(float).sum(-2)
    return (w * np.arange(w.shape[-1])).sum(-1) / w.sum(-1)


# ---------------------------------------------------------------- embedded


@pytest.mark.parametrize("name,key,shape", [
    ("digits_affect", "image", (32, 32, 1)), ("moving_digits", "video", (8, 32, 32, 1))])
def test_embedded_shapes_sizes_ranges(data_dir, name, key, shape):
    for split, size in embedded.SIZES[name].items():
        examples = _all(pipeline.data_source(name, split, data_dir))
        assert len(examples) == size
        x = np.stack([e[key] for e in examples])
        va = np.stack([e["va"] for e in examples])
        labels = np.array([e["label"] for e in examples])
        assert x.shape[1:] == shape and x.dtype == np.uint8 and x.max() > 200
        assert va.shape[1:] == shape[:-3] + (2,) and va.dtype == np.float32
        assert np.abs(va).max() <= 1.0 and va.std(axis=tuple(range(va.ndim - 1))).min() > 0.2
        assert set(labels) == set(range(10))


def test_embedded_builder_stores_the_numpy_construction(data_dir):
    made = embedded.make_moving_digits("validation")
    stored = _all(pipeline.data_source("moving_digits", "validation", data_dir))
    key = lambda v, va: (v.tobytes(), va.tobytes())  # noqa: E731  (order-free compare)
    assert sorted(key(e["video"], e["va"]) for e in stored) == sorted(
        key(v, va) for v, va in zip(made["video"], made["va"]))


def test_splits_use_disjoint_source_digits():
    pools = [embedded.digit_pool(s)[0].reshape(-1, 64) for s in embedded.SPLITS]
    seen = [{row.tobytes() for row in p} for p in pools]
    assert sum(len(p) for p in pools) == 1797
    assert not (seen[0] & seen[2]) and not (seen[0] & seen[1])


def test_static_targets_readable_from_one_image(data_dir):
    examples = _all(pipeline.data_source("digits_affect", "train", data_dir))
    img = np.stack([e["image"] for e in examples])
    va = np.stack([e["va"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    np.testing.assert_allclose(va[:, 0], np.linspace(-1, 1, 10)[labels], atol=1e-6)
    assert np.corrcoef(_com_x(img), va[:, 1])[0, 1] > 0.95


def test_video_arousal_needs_time_valence_does_not(data_dir):
    examples = _all(pipeline.data_source("moving_digits", "train", data_dir))
    video = np.stack([e["video"] for e in examples])
    va = np.stack([e["va"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    # valence: constant over time, a function of the digit (one frame suffices)
    np.testing.assert_allclose(va[..., 0], np.linspace(-1, 1, 10)[labels][:, None] * np.ones(8),
                               atol=1e-6)
    # arousal: unrelated to what one frame shows (position), but equal to the
    # motion between frames (central difference of the centre of mass)
    com = _com_x(video)
    assert abs(np.corrcoef(com.ravel(), va[..., 1].ravel())[0, 1]) < 0.2
    speed = (com[:, 2:] - com[:, :-2]) / 2
    assert np.corrcoef(speed.ravel(), va[:, 1:-1, 1].ravel())[0, 1] > 0.98
    # the very same frame occurs with different arousal
    digit = embedded.digit_pool("train")[0][0]
    (xa, va_), (xb, vb_) = embedded.trajectory(3.0, -1.5, 1.0), embedded.trajectory(3.0, 2.0, 0.0)
    fa, fb = embedded.render(digit, xa, 5.0), embedded.render(digit, xb, 5.0)
    np.testing.assert_array_equal(fa[0], fb[0])
    assert abs(va_[0] - vb_[0]) / embedded.VMAX > 1.5


# ---------------------------------------------------------------- pipeline


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_train_batches_types_and_determinism(data_dir):
    kw = dict(batch_size=16, shard_index=0, shard_count=1)
    a = _take(pipeline.train_iterator("moving_digits", "train", data_dir, seed=3, **kw), 3)
    b = _take(pipeline.train_iterator("moving_digits", "train", data_dir, seed=3, **kw), 3)
    c = _take(pipeline.train_iterator("moving_digits", "train", data_dir, seed=4, **kw), 1)
    _assert_same(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    v = a[0]["video"]
    assert v.shape == (16, 8, 32, 32, 1) and v.dtype == np.uint8 and 0 <= v.min() < v.max() <= 255
    assert a[0]["va"].shape == (16, 8, 2) and a[0]["label"].dtype == np.int32


def test_resume_from_saved_state_gives_same_batches(data_dir):
    kw = dict(batch_size=64, seed=0, shard_index=0, shard_count=1)
    it = pipeline.train_iterator("digits_affect", "test", data_dir, **kw)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive serialisation
    expected = _take(it, 4)                          # crosses the epoch boundary (4 steps)
    fresh = pipeline.train_iterator("digits_affect", "test", data_dir, **kw)
    fresh.set_state(state)
    _assert_same(_take(fresh, 4), expected)


def test_training_data_resumes_with_its_workers_value_only(data_dir):
    """grain's positions differ with and without worker processes: the stage's iterator state
    records config.data.workers and a resume with another value is refused, naming it."""
    from ml_collections import ConfigDict

    from hocp_jax.training.data import Data
    cfg = ConfigDict(dict(static="digits_affect", data_dir=str(data_dir), batch_size=64, eval_batch_size=64,
                          eval_split="test"))
    it = Data(cfg, "digits_affect").train_iter(seed=0)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state["workers"] == 0
    expected = _take(it, 2)
    fresh = Data(cfg, "digits_affect").train_iter(seed=0)
    fresh.set_state(state)
    _assert_same(_take(fresh, 2), expected)
    cfg.workers = 2
    with pytest.raises(ValueError, match=r"config.data.workers=2: .* saved with workers=0.*--config.data.workers=0"):
        Data(cfg, "digits_affect").train_iter(seed=0).set_state(state)


def test_worker_processes_ignore_a_sigterm_left_to_the_training_process(data_dir):
    """A preemption notice sent to the whole process group (SLURM, a VM's shutdown) must not end
    grain's worker processes before the training process checkpoints: they ignore SIGTERM, and the
    batches go on, the same as without workers."""
    import multiprocessing
    import os
    import signal
    import time

    from absl import flags
    flags.FLAGS.mark_as_parsed()  # grain's workers read its flags (train.py parses them)
    kw = dict(batch_size=64, seed=0)
    it = pipeline.train_iterator("digits_affect", "test", data_dir, workers=1, **kw)
    _take(it, 1)
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(1)
    assert all(worker.is_alive() for worker in workers)
    _assert_same(_take(it, 3), _take(pipeline.train_iterator("digits_affect", "test", data_dir, **kw), 4)[1:])


def test_epochs_are_permutations_and_reshuffled(data_dir):
    source = pipeline.data_source("digits_affect", "test", data_dir)
    steps = pipeline.steps_per_epoch(source, batch_size=64, shard_count=1)
    assert steps == 300 // 64
    ds = pipeline.train_batches(source, batch_size=64, seed=0, shard_index=0, shard_count=1)
    ids = [np.concatenate([ds[e * steps + k]["image"].reshape(64, -1) @ np.arange(1024.0)
                           for k in range(steps)]) for e in range(2)]
    for epoch in ids:  # no example twice within an epoch
        assert len(np.unique(epoch)) == steps * 64
    assert not np.array_equal(ids[0], ids[1])


def test_every_host_has_the_same_epoch_length():
    # 11 examples over 2 hosts (6 and 5), 3 per host per batch: each host's epoch is ONE batch, so
    # hosts stay on the same epoch (the 6-example shard used to run 2 batches per epoch)
    source = [{"x": np.int32(i)} for i in range(11)]
    assert pipeline.steps_per_epoch(source, batch_size=6, shard_count=2) == 1
    for host in range(2):
        epoch = pipeline.epoch_batches(source, batch_size=6, seed=0, shard_index=host, shard_count=2)
        assert len(epoch) == 1 and set(epoch[0]["x"]) <= set(range(host, 11, 2))
        ds = pipeline.train_batches(source, batch_size=6, seed=0, shard_index=host, shard_count=2)
        np.testing.assert_array_equal(ds[0]["x"], epoch[0]["x"])
    with pytest.raises(ValueError, match="batch_size=12: larger than the 5 examples every one of the 2 shards holds"):
        pipeline.train_batches(source, batch_size=12, seed=0, shard_index=0, shard_count=2)


def test_host_sharding_partitions_the_data(data_dir):
    n = len(pipeline.data_source("moving_digits", "test", data_dir))
    seen = []
    for host in range(2):
        batches = list(pipeline.eval_batches("moving_digits", "test", data_dir,
                                             batch_size=32, shard_index=host, shard_count=2))
        assert all(b["video"].shape[0] == 16 for b in batches)
        seen += [v.tobytes() for b in batches for v, m in zip(b["video"], b["mask"]) if m]
        train = next(pipeline.train_iterator("moving_digits", "test", data_dir, batch_size=32,
                                             seed=0, shard_index=host, shard_count=2))
        assert train["video"].shape[0] == 16
    assert len(seen) == n == len(set(seen))


def test_read_options_change_nothing_but_speed(data_dir):
    kw = dict(batch_size=16, seed=1, shard_index=0, shard_count=1)
    a = _take(pipeline.train_iterator("digits_affect", "test", data_dir, **kw), 2)
    b = _take(pipeline.train_iterator("digits_affect", "test", data_dir, read_threads=4, prefetch=0, **kw), 2)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="read_threads=0"):
        pipeline.train_iterator("digits_affect", "test", data_dir, read_threads=0, **kw)


def test_bad_arguments_raise_clear_errors(data_dir):
    with pytest.raises(ValueError, match="name='nope'"):
        pipeline.get_builder("nope", data_dir)
    with pytest.raises(ValueError, match=r"name='affectnet/s999': affectnet has no builder config 's999'.*'affectnet/s224'"):
        pipeline.get_builder("affectnet/s999", data_dir)
    with pytest.raises(ValueError, match="split='dev'"):
        pipeline.data_source("digits_affect", "dev", data_dir)
    with pytest.raises(ValueError, match="batch_size=3"):
        pipeline.train_iterator("digits_affect", "test", data_dir, batch_size=3, seed=0,
                                shard_index=0, shard_count=2)
    with pytest.raises(FileNotFoundError, match="cifar10"):
        pipeline.data_source("cifar10", "train", data_dir / "empty")
    # a misspelt name: was "catalog dataset not prepared ... Prepare it once with `tfds build affectnett`"
    for typo, meant in (("affectnett", "affectnet"), ("moving_digit", "moving_digits")):
        with pytest.raises(FileNotFoundError, match=f"name='{typo}' \\(did you mean '{meant}'\\?\\): not a dataset of this project"):
            pipeline.data_source(typo, "train", data_dir / "empty")
    source = pipeline.data_source("digits_affect", "test", data_dir)
    for bad in (0, 3, -2):  # was: ZeroDivisionError, or a negative count of steps
        with pytest.raises(ValueError, match=f"batch_size={bad}: expected a positive multiple of shard_count=2"):
            pipeline.steps_per_epoch(source, batch_size=bad, shard_count=2)
    for kwargs, words in ((dict(batch_size=True, seed=0), "batch_size=True"), (dict(batch_size=2, seed=1.5), "seed=1.5"),
                          (dict(batch_size=2, seed=0, shard_index=0.0, shard_count=1), "shard_index=0.0")):
        with pytest.raises(ValueError, match=words):  # were accepted or TypeErrors
            pipeline.train_batches(source, **kwargs)
    from hocp_jax.data import embedded
    with pytest.raises(ValueError, match="num_examples=-1"):
        embedded.make_digits_affect("test", -1)
    with pytest.raises(ValueError, match="num_frames=1: expected an int >= 2"):  # was: NaN positions
        embedded.trajectory(0.0, 1.0, 2.0, 1)
    with pytest.raises(ValueError, match="AfewVaConfig num_frames=0"):
        AfewVaConfig(name="bad", num_frames=0)
    with pytest.raises(ValueError, match="AfewVaConfig margin=inf: expected a finite"):  # was: infinite face boxes
        AfewVaConfig(name="bad", margin=float("inf"))
    for size in (0, "64", 8.0):  # were not checked
        with pytest.raises(ValueError, match=f"AffectNetConfig image_size={size!r}: expected an int >= 1"):
            AffectNetConfig(name="bad", image_size=size)
    # were: AttributeErrors, a config of another dataset accepted, the name's config silently ignored
    for name, config, words in (
            (None, None, "name=None: expected a dataset name"),
            ("affectnet", 123, "config=123: expected a config name or an instance of AffectNetConfig"),
            ("affectnet", AfewVaConfig(name="t8_s64"), "config=AfewVaConfig.*instance of AffectNetConfig"),
            ("affectnet/s224", "s64", "name='affectnet/s224' and config='s64': two different configs"),
            ("affectnet", "s999", "config='s999': affectnet has no builder config 's999'")):
        with pytest.raises(ValueError, match=words):
            pipeline.get_builder(name, data_dir, config=config)
    assert pipeline.get_builder("affectnet", data_dir, config="s224").builder_config.image_size == 224


# ---------------------------------------------------------------- manual datasets


def test_crop_resize_refuses_what_it_cannot_crop():
    image = Image.fromarray(np.full((40, 50, 3), 100, np.uint8))
    assert manual.crop_resize(image, (10, 5, 40, 35), 8).shape == (8, 8, 3)
    for box, words in (((10, 5, 10, 35), "box=.10.0, 5.0, 10.0, 35.0. on a 50x40 image: expected a non-empty"),
                       ((100, 100, 130, 130), "on a 50x40 image: .* overlapping the image"),
                       ((np.nan, 5, 40, 35), "box=.nan, 5, 40, 35.: expected 4 finite numbers"),
                       ((1, 2, 3), "box=.1, 2, 3.: expected 4 finite numbers")):
        with pytest.raises(ValueError, match=words):  # were: all-zero images, or errors from PIL
            manual.crop_resize(image, box, 8)
    with pytest.raises(ValueError, match="size=8.5: expected an int >= 1"):
        manual.crop_resize(image, (10, 5, 40, 35), 8.5)
    float_image = Image.fromarray(np.full((40, 50), 1000.5, np.float32))  # was: wrapped to 232
    for bad, words in ((float_image, "mode 'F'"), (np.asarray(image), "ndarray")):
        with pytest.raises(ValueError, match=rf"image \({words}\): expected an 8-bit PIL image"):
            manual.crop_resize(bad, (10, 5, 40, 35), 8)


def _write_afew_clip(root, number, num_frames, rng):
    """One AFEW-VA video folder: PNG frames with a white face square where
    the landmarks are, and <id>.json in the official layout."""
    vid = f"{number:03d}"
    folder = root / vid
    folder.mkdir(parents=True)
    frames = {}
    for t in range(num_frames):
        x0, y0 = rng.integers(2, 20, 2)
        img = np.zeros((48, 64, 3), np.uint8)
        img[y0:y0 + 20, x0:x0 + 20] = 255
        Image.fromarray(img).save(folder / f"{t:05d}.png")
        pts = rng.uniform(0, 19, (68, 2)) + [x0, y0]
        pts[:2] = [[x0, y0], [x0 + 19, y0 + 19]]  # the box is exactly the square
        frames[f"{t:05d}"] = {"valence": int(rng.integers(-10, 11)),
                              "arousal": int(rng.integers(-10, 11)),
                              "landmarks": pts.tolist()}
    (folder / f"{vid}.json").write_text(json.dumps({"video_id": vid, "frames": frames}))
    return frames


def test_afew_va_builder_on_fixture(tmp_path):
    rng = np.random.default_rng(0)
    manual_dir = tmp_path / "manual" / "01"  # like the official archive parts
    clips = {n: _write_afew_clip(manual_dir, n, 10, rng) for n in (1, 7, 8)}
    config = AfewVaConfig(name="t4_s16", num_frames=4, stride=4, image_size=16, margin=0.0)
    builder = pipeline.build("afew_va", tmp_path / "tfds", manual_dir=tmp_path / "manual",
                             config=config)
    for number, frames in clips.items():
        examples = _all(builder.as_data_source(split=split_of(number)))
        assert sorted(e["start_frame"] for e in examples) == [0, 4]  # 10 frames -> 2 clips
        for e in examples:
            keys = [f"{t:05d}" for t in range(e["start_frame"], e["start_frame"] + 4)]
            want = [[frames[k]["valence"] / 10, frames[k]["arousal"] / 10] for k in keys]
            np.testing.assert_allclose(e["va"], want, atol=1e-6)
            assert e["clip_id"] == number
            assert e["video"].shape == (4, 16, 16, 3) and e["video"].dtype == np.uint8
            assert e["video"][:, 2:-2, 2:-2].min() == 255  # the crop is the face square


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_afew_va_orders_frames_by_number(tmp_path):
    # unpadded frame names "0" ... "11" (sorted as strings, "10" came before "2")
    rng, manual_dir = np.random.default_rng(3), tmp_path / "manual"
    clips = {n: _write_afew_clip(manual_dir, n, 12, rng) for n in (1, 7, 8)}
    for number in clips:
        folder = manual_dir / f"{number:03d}"
        for t in range(12):
            (folder / f"{t:05d}.png").rename(folder / f"{t}.png")
        _edit_json(folder / f"{number:03d}.json", lambda doc: doc.update(
            frames={str(int(k)): v for k, v in doc["frames"].items()}))
    config = AfewVaConfig(name="t12_s8", num_frames=12, stride=12, image_size=8)
    builder = pipeline.build("afew_va", tmp_path / "tfds", manual_dir=manual_dir, config=config)
    for number, frames in clips.items():
        clip = builder.as_data_source(split=split_of(number))[0]
        want = [[frames[f"{t:05d}"][k] / 10 for k in ("valence", "arousal")] for t in range(12)]
        np.testing.assert_allclose(clip["va"], want, atol=1e-6)


def _set_frame(field, value):
    return lambda m: _edit_json(m / "001" / "001.json", lambda doc: doc["frames"]["00000"].update({field: value}))


def _non_numeric_folder(m):  # abc/abc.json
    _write_afew_clip(m / "x", 2, 2, np.random.default_rng(0))
    (m / "x" / "002" / "002.json").rename(m / "x" / "002" / "abc.json")
    (m / "x" / "002").rename(m / "abc")


@pytest.mark.parametrize("edit,num_frames,words", [
    # were: stored as 1.5 / NaN, KeyErrors, TypeErrors, int() errors, TFDS's duplicate-key and
    # empty-split errors, a JSONDecodeError without the file
    (_set_frame("valence", 15), 2, r"001.json frame '00000': valence, arousal = \[15, .*\], expected numbers in \[-10, 10\]"),
    (_set_frame("arousal", None), 2, r"001.json frame '00000': valence, arousal = \[.*, None\], expected numbers"),
    (_set_frame("landmarks", [1, 2, 3]), 2, r"001.json frame '00000': landmarks: expected a list of \[x, y\] points"),
    (_set_frame("landmarks", [[500, 500]] * 2 + [[600, 600]]), 2,
     r"001.json frame '00000': face box of the landmarks: box=.* on a 64x48 image"),
    (lambda m: _edit_json(m / "001" / "001.json", lambda doc: doc.pop("frames")), 2, r"001.json: expected \{\"frames\""),
    (lambda m: (m / "001" / "001.json").write_text("{not json"), 2, r"001.json: not valid JSON"),
    (_non_numeric_folder, 2, r"abc.json: folder 'abc' is not a video number"),
    (lambda m: _write_afew_clip(m / "02", 1, 4, np.random.default_rng(0)), 2,
     r"video number 1 appears twice: .*manual/001/001.json and .*manual/02/001/001.json"),
    (lambda m: None, 5, r"split 'train': no examples from .*manual \(each of its 1 videos is shorter than num_frames=5\)"),
])
def test_afew_va_invalid_files_are_clear_errors(tmp_path, edit, num_frames, words):
    manual_dir = tmp_path / "manual"
    for number in (1, 7, 8):
        _write_afew_clip(manual_dir, number, 4, np.random.default_rng(number))
    edit(manual_dir)
    config = AfewVaConfig(name="t_s8", num_frames=num_frames, stride=2, image_size=8)
    with pytest.raises(ValueError, match=words):
        pipeline.build("afew_va", tmp_path / "tfds", manual_dir=manual_dir, config=config)


def _write_affectnet(root, rng):
    (root / "Manually_Annotated_Images" / "12").mkdir(parents=True)
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
              "facial_landmarks", "expression", "valence", "arousal"]
    rows = {}
    for csv_name, n in (("training.csv", 60), ("validation.csv", 5)):
        with open(root / csv_name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i in range(n):
                rel = f"12/{csv_name[:3]}{i:03d}.jpg"
                colour = rng.integers(0, 256, 3)
                img = np.zeros((40, 50, 3), np.uint8)
                img[5:35, 10:40] = colour
                Image.fromarray(img).save(root / "Manually_Annotated_Images" / rel, quality=95,
                                          subsampling=0)
                expression = int(rng.integers(0, 11))
                va = rng.uniform(-1, 1, 2).round(6) if expression < 8 else [-2, -2]
                lms = ";".join(f"{v:.2f}" for v in rng.uniform(0, 40, 136))
                writer.writerow([rel, 10, 5, 30, 30, lms, expression, *va])
                rows[rel] = (csv_name, expression, np.asarray(va, np.float32), colour)
    return rows


def test_affectnet_builder_on_fixture(tmp_path):
    rows = _write_affectnet(tmp_path / "manual", np.random.default_rng(1))
    # no training row of class 7 (its faces made class 9, which is dropped): label_counts must still count it, as 0
    _edit_csv(tmp_path / "manual" / "training.csv",
              lambda lines: lines[:1] + [[*x[:6], "9" if x[6] == "7" else x[6], *x[7:]] for x in lines[1:]])
    assert any(r[1] == 7 for r in rows.values() if r[0] == "training.csv")
    rows = {rel: (r[0], 9, *r[2:]) if r[0] == "training.csv" and r[1] == 7 else r for rel, r in rows.items()}
    builder = pipeline.build("affectnet", tmp_path / "tfds", manual_dir=tmp_path / "manual",
                             config=AffectNetConfig(name="s8", image_size=8))
    kept = {rel: r for rel, r in rows.items() if r[1] < 8}
    want_split = {rel: "test" if r[0] == "validation.csv" else split_of_training_row(rel)
                  for rel, r in kept.items()}
    got = {s: _all(builder.as_data_source(split=s)) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in got.items()} == {
        s: sum(w == s for w in want_split.values()) for s in got}
    by_colour = {tuple(r[3]): r for r in kept.values()}
    for examples in got.values():
        for e in examples:
            assert e["image"].shape == (8, 8, 3)
            colour = tuple(np.round(e["image"].reshape(-1, 3).mean(0)).astype(int))
            match = min(by_colour, key=lambda c: np.abs(np.subtract(c, colour)).max())
            assert np.abs(np.subtract(match, colour)).max() <= 6  # jpeg of a flat face box
            _, expression, va, _ = by_colour[match]
            assert e["label"] == expression
            np.testing.assert_allclose(e["va"], va, atol=1e-6)
    # class counts for the weighted loss: the labels only; the zlib images stay compressed
    labels = [int(e["label"]) for e in got["train"]]
    counts = pipeline.label_counts("affectnet", "train", tmp_path / "tfds", config=AffectNetConfig(name="s8", image_size=8))
    assert counts == np.bincount(labels, minlength=8).tolist()  # one count per class, 0 where the split has none
    skip = {"image": tfds.decode.SkipDecoding(), "va": tfds.decode.SkipDecoding()}
    raw = builder.as_data_source(split="train", decoders=skip)[0]["image"]
    assert isinstance(raw, bytes) and len(raw) != 8 * 8 * 3  # what label_counts leaves undecoded


def _edit_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


@pytest.mark.parametrize("edit,words", [
    # were: kept as -1 / 7 (left to TFDS), AttributeErrors, KeyErrors, OverflowErrors, TFDS's empty-split error
    (lambda rows: rows[:1] + [["-1", *rows[1][1:]]] + rows[2:], r"line 2: emotion='-1', expected an integer in \[0, 6\]"),
    (lambda rows: rows[:2] + [["x", *rows[2][1:]]] + rows[3:], r"line 3: emotion='x', expected an integer in \[0, 6\]"),
    (lambda rows: rows[:1] + [[rows[1][0], "256" + " 0" * 2303, rows[1][2]]] + rows[2:],
     r"line 2: pixels: 2304 values \(one is '256'\), expected 2304 integers in \[0, 255\]"),
    (lambda rows: rows[:1] + [rows[1][:1]] + rows[2:], r"line 2: 1 fields, expected 3 \(emotion,pixels,Usage\)"),
    (lambda rows: rows[:1] + [[*rows[1][:2], "Validation"]] + rows[2:], r"line 2: Usage='Validation', expected one of"),
    (lambda rows: [r[:2] for r in rows], r"fer2013.csv: header \['emotion', 'pixels'\], expected .* \(missing \['Usage'\]\)"),
    (lambda rows: [r for r in rows if r[2] != "PublicTest"],
     r"split 'validation': no examples from .*fer2013.csv \(no row with Usage=PublicTest\)"),
])
def test_fer2013_invalid_rows_are_clear_errors(tmp_path, edit, words):
    _write_fer2013(tmp_path / "manual", np.random.default_rng(2))
    _edit_csv(tmp_path / "manual" / "fer2013.csv", edit)
    with pytest.raises(ValueError, match=words):
        pipeline.build("fer2013", tmp_path / "tfds", manual_dir=tmp_path / "manual")


def test_fer2013_header_with_utf8_bom(tmp_path):  # as saved by Excel; was: KeyError 'emotion'
    _write_fer2013(tmp_path / "manual", np.random.default_rng(2))
    path = tmp_path / "manual" / "fer2013.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(pipeline.data_source("fer2013", "test", tmp_path / "tfds", manual_dir=tmp_path / "manual")) == 3


def _affectnet_row(rel, expression="1", valence="0.5", width="30", x="10"):
    return [rel, x, "5", width, "30", "1;2", expression, valence, "-0.5"]


@pytest.mark.parametrize("edit,words", [
    # were: kept (-1, NaN), an all-zero face, bare float()/KeyError/TypeError errors, TFDS's errors
    (lambda rows: rows + [_affectnet_row("12/new.jpg", expression="-1")],
     r"validation.csv line 7: expression='-1', expected an integer in \[0, 10\]"),
    (lambda rows: rows + [_affectnet_row("12/new.jpg", valence="nan")], r"line 7: valence='nan', expected a finite number"),
    (lambda rows: rows + [_affectnet_row("12/new.jpg", width="abc")], r"line 7: face_width='abc', expected a finite number"),
    (lambda rows: rows + [_affectnet_row("12/new.jpg", width="0")],
     r"line 7: face_x, face_y, face_width, face_height = 10, 5, 0, 30: box=.* on a 50x40 image: expected a non-empty box"),
    (lambda rows: rows + [_affectnet_row("12/new.jpg", x="1000")], r"line 7: .*overlapping the image"),
    (lambda rows: rows + [rows[1]], r"subDirectory_filePath '12/val000.jpg' appears twice: .*line 2 and .*line 7"),
    (lambda rows: rows + [rows[1][:3]], r"line 7: 3 fields, expected 9"),
    (lambda rows: [r[:-1] for r in rows], r"validation.csv: header .*, expected the columns .* \(missing \['arousal'\]\)"),
    (lambda rows: rows[:1] + [r for r in rows[1:] if int(r[6]) >= 8],
     r"split 'test': no examples from .*validation.csv \(no row with expression 0-7 and valence/arousal in \[-1, 1\]\)"),
])
def test_affectnet_invalid_rows_are_clear_errors(tmp_path, edit, words):
    _write_affectnet(tmp_path / "manual", np.random.default_rng(1))
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "manual" / "Manually_Annotated_Images" / "12/new.jpg")
    _edit_csv(tmp_path / "manual" / "validation.csv", edit)
    with pytest.raises(ValueError, match=words):
        pipeline.build("affectnet", tmp_path / "tfds", manual_dir=tmp_path / "manual",
                       config=AffectNetConfig(name="s8", image_size=8))


def _write_fer2013(folder, rng):
    """fer2013.csv with 4 train, 2 validation and 3 test faces; returns their pixels."""
    folder.mkdir(parents=True)
    usage = ["Training"] * 4 + ["PublicTest"] * 2 + ["PrivateTest"] * 3
    pixels = rng.integers(0, 256, (len(usage), 48 * 48))
    with open(folder / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for i, u in enumerate(usage):
            writer.writerow([i % 7, " ".join(map(str, pixels[i])), u])
    return pixels


def test_files_in_the_default_manual_folder_are_found(tmp_path):
    # TFDS's default manual_dir, <data_dir>/downloads/manual, is used when none is given
    _write_fer2013(tmp_path / "tfds" / "downloads" / "manual", np.random.default_rng(2))
    assert len(pipeline.data_source("fer2013", "test", tmp_path / "tfds")) == 3


def test_fer2013_builder_on_fixture(tmp_path):
    pixels = _write_fer2013(tmp_path / "manual", np.random.default_rng(2))
    builder = pipeline.build("fer2013", tmp_path / "tfds", manual_dir=tmp_path / "manual")
    test = _all(builder.as_data_source(split="test"))
    assert len(test) == 3 and len(builder.as_data_source(split="validation")) == 2
    want = {i % 7: pixels[i].reshape(48, 48, 1) for i in range(6, 9)}
    for e in test:
        np.testing.assert_array_equal(e["image"], want[e["label"]])
    batch = next(pipeline.eval_batches("fer2013", "train", tmp_path / "tfds", batch_size=4,
                                       shard_index=0, shard_count=1))
    assert batch["image"].shape == (4, 48, 48, 1) and "va" not in batch
    # 2 validation examples over 3 hosts: host 2's shard is empty, yet it yields as many
    # (masked) batches as the others, so that no host waits in a collective (was: ZeroDivisionError)
    masks = [[b["mask"].tolist() for b in pipeline.eval_batches(
        "fer2013", "validation", tmp_path / "tfds", batch_size=3, shard_index=host, shard_count=3)]
        for host in range(3)]
    assert masks == [[[1.0]], [[1.0]], [[0.0]]]


@pytest.mark.parametrize("name,expected", [
    ("affectnet", "validation.csv"), ("fer2013", "fer2013.csv"), ("afew_va", "001.json")])
def test_missing_manual_files_name_the_expected_path(tmp_path, name, expected):
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    (manual_dir / "training.csv").write_text("x\n")  # not empty, but incomplete
    with pytest.raises(FileNotFoundError, match=str(manual_dir / "") + ".*" + expected):
        pipeline.build(name, tmp_path / "tfds", manual_dir=manual_dir)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        pipeline.build(name, tmp_path / "tfds", manual_dir=tmp_path / "absent")
    with pytest.raises(ValueError, match=r"manual_dir=.*training.csv' \(train.py: config.data.manual_dir\): a file"):
        pipeline.build(name, tmp_path / "tfds", manual_dir=manual_dir / "training.csv")  # was: NotADirectoryError
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        pipeline.data_source(name, "train", tmp_path / "tfds")
