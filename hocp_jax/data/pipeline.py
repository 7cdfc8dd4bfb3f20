"""Input pipeline: dataset name -> deterministic, host-sharded numpy batches.

Storage and reading use TFDS without TensorFlow: builders write array_record
files (``file_format="array_record"``; images/videos are uint8 tensors,
zlib-compressed) and are read back with ``as_data_source`` (random access);
grain shuffles, batches and tracks the position. No TensorFlow is needed to
build the project's datasets or to train (catalog datasets such as cifar10
are prepared once with ``tfds build cifar10 --file_format=array_record``,
which may need TensorFlow on that machine).

Datasets (``name`` or ``name/config``):
  digits_affect, moving_digits   embedded, built offline on first use
  afew_va, affectnet, fer2013    from manual_dir (see each module)
  jester                         from manual_dir (see hocp_jax/data/jester.py)
  anything else                  the TFDS catalog, e.g. "cifar10"
Batches are dicts of numpy arrays: images/videos stay uint8 ("image"
(B, H, W, C) or "video" (B, T, H, W, C); 4x fewer bytes to the device than
float32; the jitted step scales them to [0, 1], see
hocp_jax.training.step.model_input), "va" float32
(B, 2) or (B, T, 2) where the dataset has valence/arousal, "label" int32 (B,)
where it has classes, other integer fields int32; text fields are dropped.

Sharding: ``batch_size`` is GLOBAL; host ``shard_index`` of ``shard_count``
(default jax.process_index() / jax.process_count()) reads examples
shard_index::shard_count and yields batch_size // shard_count of them.
"""
import difflib
import os
import signal

import jax
import numpy as np
import grain
import tensorflow_datasets as tfds

from hocp_jax.checks import check_int, check_positive_int, is_int, is_positive_int
from hocp_jax.data.afew_va import AfewVa
from hocp_jax.data.affectnet import Affectnet
from hocp_jax.data.embedded import DigitsAffect, MovingDigits
from hocp_jax.data.fer2013 import Fer2013
from hocp_jax.data.jester import Jester

BUILDERS = {"digits_affect": DigitsAffect, "moving_digits": MovingDigits,
            "afew_va": AfewVa, "affectnet": Affectnet, "fer2013": Fer2013,
            "jester": Jester}
EMBEDDED = ("digits_affect", "moving_digits")


def get_builder(name: str, data_dir, *, config=None) -> tfds.core.DatasetBuilder:
    """Builder of a project dataset ("afew_va" or "afew_va/t8_s64").

    config: optional config name (as after the "/") or BuilderConfig instance (e.g.
    AfewVaConfig(name="t16_s96", num_frames=16, image_size=96)) instead of a named one; a
    ValueError if it is of another dataset or conflicts with the name's "/<config>".
    """
    if _base(name) not in BUILDERS:
        raise ValueError(f"name={name!r}: not a project dataset, expected one of "
                         f"{sorted(BUILDERS)}")
    base, _, config_name = name.partition("/")
    configs = BUILDERS[base].BUILDER_CONFIGS
    if not (config is None or isinstance(config, str)
            or configs and isinstance(config, type(configs[0]))):
        expected = f"a config name or an instance of {type(configs[0]).__name__}" if configs else "None"
        raise ValueError(f"config={config!r}: expected {expected} for {base}")
    given = getattr(config, "name", config)  # the name of a config, or the string itself
    if config_name and given and given != config_name:
        raise ValueError(f"name={name!r} and config={config!r}: two different configs, give one")
    if isinstance(config, str):
        config_name, config = config_name or config, None
    if config is None and config_name and config_name not in [c.name for c in configs]:
        arg = f"config={given!r}" if given else f"name={name!r}"
        raise ValueError(f"{arg}: {base} has no builder config {config_name!r}, expected one of "
                         f"{[f'{base}/{c.name}' for c in configs]} (or pass config=)")
    return BUILDERS[base](data_dir=str(data_dir), file_format="array_record",
                          config=config or config_name or None)


def _base(name) -> str:
    """The dataset of ``name`` ("afew_va/t8_s64" -> "afew_va"); a ValueError unless a string."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: expected a dataset name such as 'afew_va', "
                         "'afew_va/t8_s64' or a TFDS catalog name")
    return name.partition("/")[0]


def build(name: str, data_dir, *, manual_dir=None, config=None) -> tfds.core.DatasetBuilder:
    """Prepares a project dataset under data_dir (no-op if already there).

    manual_dir: folder with the downloaded files of afew_va/affectnet/fer2013/jester
    (default <data_dir>/downloads/manual); FileNotFoundError naming the
    expected path when they are missing.
    """
    builder = get_builder(name, data_dir, config=config)
    if manual_dir is not None and os.path.exists(manual_dir) and not os.path.isdir(manual_dir):
        raise ValueError(f"manual_dir={os.fspath(manual_dir)!r} (train.py: config.data.manual_dir): a file; expected "
                         f"the folder of {name}'s downloaded files")
    download_config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else str(manual_dir))
    builder.download_and_prepare(download_config=download_config)
    return builder


def prepare(name: str, data_dir, *, manual_dir=None, config=None) -> tfds.core.DatasetBuilder | None:
    """The builder of project dataset ``name``, built first if it is not prepared: embedded
    datasets always, manual ones when manual_dir is given or TFDS's default manual folder
    ``<data_dir>/downloads/manual`` exists (else FileNotFoundError with the download
    instructions). None for a catalog dataset (prepared with ``tfds build``)."""
    base = _base(name)
    if base not in BUILDERS:
        return None
    builder = get_builder(name, data_dir, config=config)
    if builder.is_prepared():
        return builder
    default_manual = os.path.join(str(data_dir), "downloads", "manual")
    if base in EMBEDDED or manual_dir is not None or os.path.isdir(default_manual):
        return build(name, data_dir, manual_dir=manual_dir, config=config)
    raise FileNotFoundError(
        f"name={name!r} is not prepared in {builder.data_dir}; give the folder of its downloaded "
        f"files (train.py: --config.data.manual_dir=<folder>; here: manual_dir=<folder>; or put them "
        f"in {default_manual}) to build it.\n"
        f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")


def data_source(name: str, split: str, data_dir, *, manual_dir=None, config=None,
                decoders=None):
    """Random-access source of one split (``len``, ``[i]`` -> dict of numpy).

    Embedded datasets are built if missing; manual ones too when manual_dir
    is given; catalog datasets must already be prepared (array_record).
    decoders: ``{feature: tfds.decode.SkipDecoding()}`` leaves those features
    undecoded (see :func:`label_counts`).
    """
    builder = prepare(name, data_dir, manual_dir=manual_dir, config=config)
    if builder is None:
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                    decoders=decoders)
        except Exception as err:  # tfds raises several types for "not prepared"
            close = difflib.get_close_matches(_base(name), [*BUILDERS, *tfds.list_builders(with_community_datasets=False)], 1)
            raise FileNotFoundError(
                f"name={name!r}{f' (did you mean {close[0]!r}?)' if close else ''}: not a dataset of this project "
                f"({', '.join(BUILDERS)}) nor a TFDS catalog dataset prepared in data_dir={data_dir} "
                f"({type(err).__name__} from TFDS); a catalog dataset is prepared once with `tfds build "
                f"{name} --data_dir={data_dir} --file_format=array_record`.") from err
    if split not in builder.info.splits:
        raise ValueError(f"split={split!r}: {name} has splits "
                         f"{sorted(builder.info.splits)}")
    return builder.as_data_source(split=split, decoders=decoders)


def label_counts(name: str, split: str, data_dir, *, manual_dir=None, config=None) -> list[int]:
    """Examples per class of a split, one count per class of the dataset (0 for a class the split
    lacks). Every feature but "label" is left undecoded
    (SkipDecoding: zlib-compressed images/videos are not decompressed, encoded images not
    decoded); the records themselves are still read."""
    features = data_source(name, split, data_dir, manual_dir=manual_dir, config=config).dataset_info.features
    skip = {key: tfds.decode.SkipDecoding() for key in features if key != "label"}
    source = data_source(name, split, data_dir, manual_dir=manual_dir, config=config, decoders=skip)
    labels = np.fromiter((int(source[i]["label"]) for i in range(len(source))), np.int64, len(source))
    return np.bincount(labels, minlength=features["label"].num_classes).tolist()  # classes the split lacks: 0


def to_numpy(example: dict) -> dict:
    """One decoded example -> model inputs (uint8 kept, other ints int32, floats float32)."""
    out = {}
    for key, value in example.items():
        value = np.asarray(value)
        if value.dtype == np.uint8:
            out[key] = value
        elif np.issubdtype(value.dtype, np.integer):
            out[key] = value.astype(np.int32)
        elif np.issubdtype(value.dtype, np.floating):
            out[key] = value.astype(np.float32)
    return out


def shard_of(shard_index, shard_count, batch_size):
    """``(shard_index, shard_count, local batch size)`` of this host (None: ``jax.process_index()``
    / ``jax.process_count()``); a ValueError unless ``batch_size`` divides into the shards."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    check_positive_int(shard_count, "shard_count")
    if not (is_int(shard_index) and 0 <= shard_index < shard_count):
        raise ValueError(f"shard_index={shard_index}: expected 0 <= index < "
                         f"shard_count={shard_count}")
    if not is_positive_int(batch_size) or batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size}: expected a positive multiple "
                         f"of shard_count={shard_count}")
    return shard_index, shard_count, batch_size // shard_count


def train_batches(source, *, batch_size: int, seed: int, shard_index=None,
                  shard_count=None) -> grain.MapDataset:
    """Infinite random-access MapDataset of training batches of one host.

    Each epoch is a fresh permutation (from seed and epoch) of this host's
    examples, cut into :func:`steps_per_epoch` full local batches, the same number
    on every host (the rest of an epoch is dropped: a host whose shard holds one
    example more than another's does not run ahead), so batch k is a pure
    function of (seed, k).
    """
    return epoch_batches(source, batch_size=batch_size, seed=seed, shard_index=shard_index,
                         shard_count=shard_count).repeat()


def epoch_batches(source, *, batch_size: int, seed: int, shard_index=None,
                  shard_count=None) -> grain.MapDataset:
    """One epoch of :func:`train_batches` (of length :func:`steps_per_epoch`)."""
    shard_index, shard_count, local = shard_of(shard_index, shard_count, batch_size)
    check_int(seed, "seed", 0)
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(source) // shard_count < local:
        raise ValueError(f"batch_size={batch_size}: larger than the {len(source) // shard_count} "
                         f"examples every one of the {shard_count} shards holds")
    n = steps_per_epoch(source, batch_size=batch_size, shard_count=shard_count) * local
    return ds.shuffle(seed=seed)[:n].map(to_numpy).batch(local, drop_remainder=True)


def steps_per_epoch(source, *, batch_size: int, shard_count=None) -> int:
    """Number of training batches per epoch (equal on all hosts: that of the smallest shard)."""
    _, shard_count, local = shard_of(0, shard_count, batch_size)
    return (len(source) // shard_count) // local


def train_iterator(name: str, split: str, data_dir, *, batch_size: int, seed: int,
                   shard_index=None, shard_count=None, manual_dir=None,
                   config=None, read_threads: int = 1, prefetch: int = 2,
                   workers: int = 0) -> grain.DatasetIterator:
    """Deterministic, checkpointable iterator over infinite training batches.

    ``it.get_state()`` is small (JSON or bytes); a new iterator with
    ``it.set_state(state)`` continues with exactly the same batches.
    read_threads / prefetch: grain's ReadOptions (threads reading records,
    batches read ahead); workers > 0: that many processes decode and batch
    (grain's mp_prefetch; they ignore SIGTERM, left to the training process) -- the batches do
    not change.
    """
    for arg, value, low in (("read_threads", read_threads, 1), ("prefetch", prefetch, 0),
                            ("workers", workers, 0)):
        check_int(value, arg, low)
    source = data_source(name, split, data_dir, manual_dir=manual_dir, config=config)
    ds = train_batches(source, batch_size=batch_size, seed=seed,
                       shard_index=shard_index, shard_count=shard_count)
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    ds = ds.to_iter_dataset(read_options=options)
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_ignore_sigterm)
    return iter(ds)


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
    """grain worker processes ignore SIGTERM: a scheduler's preemption notice sent to the whole
    process group must not end them before the training process checkpoints (it ends them)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def eval_batches(name: str, split: str, data_dir, *, batch_size: int,
                 shard_index=None, shard_count=None, manual_dir=None, config=None):
    """One ordered pass over a split, in fixed-size local batches.

    Every host yields the same number of batches, also one whose shard is empty (a split of
    fewer examples than hosts); the last ones are padded (copies of the split's first example)
    and carry "mask" float32 (B,), 1 for real examples and 0 for padding, so metrics must
    weight by mask.
    """
    shard_index, shard_count, local = shard_of(shard_index, shard_count, batch_size)
    source = data_source(name, split, data_dir, manual_dir=manual_dir, config=config)
    ds = grain.MapDataset.source(source)[shard_index::shard_count].map(to_numpy)
    per_host = -(-len(source) // shard_count)
    for start in range(0, per_host, local):
        real = max(0, min(local, len(ds) - start))
        examples = [ds[i] for i in range(start, start + real)]
        if real < local:
            examples += [to_numpy(source[0])] * (local - real)
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        batch["mask"] = (np.arange(local) < real).astype(np.float32)
        yield batch
