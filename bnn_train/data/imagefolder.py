"""ImageFolder trees (<root>/train/<class>/*, <root>/test/<class>/*), in memory or streamed.

In memory: every image is decoded once (resized so the shorter side is image_size, then
center-cropped) into a uint8 tensor, cached under cache_dir; later runs load the cache. Streaming:
DataLoader workers decode per batch, with RandomResizedCrop + flip for training.
Class indices follow torchvision's ImageFolder: sorted folder names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset
from torchvision.transforms.v2 import functional as TF

from bnn_train.errors import ConfigError, DataError

try:  # deprecated since torchvision 0.29 (for TorchCodec), but ~3x faster than PIL on small JPEGs
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
except ImportError:  # a torchvision without it: PIL decodes everything
    decode_jpeg = decode_image = ImageReadMode = None

from .common import (
    ROOT_FIX,
    DataBundle,
    ImageSet,
    batch_size_of,
    in_memory_bundle,
    one_line,
    resolve_root,
    val_order,
)
from .loaders import Normalizer, channel_stats, epoch_generator

log = logging.getLogger(__name__)

SPLITS = ("train", "test")  # on disk; "test" is the validation split
CACHE_VERSION = 1  # bump when the cached tensor format or the decoding changes
DECODE_CHUNK = 256  # files per decode task: big enough for batched decode_jpeg
STATS_SAMPLES = 512  # images decoded to estimate mean/std in streaming mode


class Tree(NamedTuple):
    """A validated ImageFolder tree."""

    root: Path
    classes: tuple[str, ...]
    samples: dict[str, list[tuple[str, int]]]  # split -> [(path, class index)], ImageFolder order


def default_cache_dir() -> str:
    return os.environ.get("BNN_CACHE_DIR", "data/.cache")


# --------------------------------------------------------------------------------------------
# scanning


def _class_dirs(split_dir: Path) -> list[str]:
    with os.scandir(split_dir) as it:
        return sorted(entry.name for entry in it if entry.is_dir())


def scan(root: Path) -> Tree:
    """List and validate <root>/{train,test}/<class>/*; every problem is a one-line DataError."""
    layout = "train/<class>/* and test/<class>/*"
    if not root.is_dir():
        raise DataError(f"image folder {root} not found: {ROOT_FIX} to a folder holding {layout}")
    class_lists = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir} not found: data.root must hold {layout} ({ROOT_FIX})")
        class_lists[split] = _class_dirs(split_dir)
        if not class_lists[split]:
            raise DataError(
                f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/"
            )
    train_cls, test_cls = class_lists["train"], class_lists["test"]
    if train_cls != test_cls:
        only_train = sorted(set(train_cls) - set(test_cls)) or "-"
        only_test = sorted(set(test_cls) - set(train_cls)) or "-"
        raise DataError(
            f"class folders differ between {root / 'train'} and {root / 'test'} "
            f"(only in train: {', '.join(only_train)}; only in test: {', '.join(only_test)}): "
            f"give both splits the same class folders"
        )
    class_to_idx = {name: i for i, name in enumerate(train_cls)}
    samples = {}
    for split in SPLITS:
        split_dir = root / split
        samples[split] = make_dataset(
            str(split_dir), class_to_idx, IMG_EXTENSIONS, allow_empty=True
        )
        counts = Counter(label for _, label in samples[split])
        for name, idx in class_to_idx.items():
            if counts[idx] == 0:
                raise DataError(
                    f"{split_dir / name} holds no images ({' '.join(IMG_EXTENSIONS)}): add images "
                    f"or remove that class folder from both train/ and test/"
                )
    return Tree(root, tuple(train_cls), samples)


# --------------------------------------------------------------------------------------------
# decoding


def _unreadable(path: str, exc: BaseException) -> DataError:
    return DataError(f"cannot read image {path} ({one_line(exc)}): delete or replace the file")


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (antialiased), then center crop to size x size."""
    if img.shape[-2:] != (size, size):
        img = TF.center_crop(TF.resize(img, [size], antialias=True), [size, size])
    return img


def _decode_one(path: str, data: bytes) -> torch.Tensor:
    """uint8 [3, H, W]; torchvision.io first (fast), PIL for formats it lacks (bmp, tiff, ppm)."""
    if decode_image is not None:
        try:
            return decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception:
            pass
    try:
        return T.functional.pil_to_tensor(default_loader(path))
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _decode_chunk(paths: list[str], size: int, out: torch.Tensor) -> None:
    """Decode `paths` into `out` [len(paths), 3, size, size]."""
    datas = []
    for path in paths:
        try:
            datas.append(bytearray(Path(path).read_bytes()))  # writable, for frombuffer
        except OSError as exc:
            raise _unreadable(path, exc) from None
    imgs: list[torch.Tensor | None] = [None] * len(paths)
    jpegs = [i for i, p in enumerate(paths) if p.lower().endswith((".jpg", ".jpeg")) and datas[i]]
    if jpegs and decode_jpeg is not None:
        encoded = [torch.frombuffer(datas[i], dtype=torch.uint8) for i in jpegs]
        try:  # one batched call is about twice as fast as a call per file
            for i, img in zip(jpegs, decode_jpeg(encoded, mode=ImageReadMode.RGB)):
                imgs[i] = img
        except Exception:
            pass  # some file is odd: fall back to one by one, which also names the culprit
    for i, path in enumerate(paths):
        img = imgs[i] if imgs[i] is not None else _decode_one(path, datas[i])
        out[i] = _fit(img, size)


def decode_files(paths: list[str], size: int) -> torch.Tensor:
    """Decode images into a uint8 tensor [N, 3, size, size], in parallel threads.

    The decoders release the GIL, so threads use all cores without pickling pixels between
    processes or forking a process that holds CUDA/OpenMP state.
    """
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    starts = range(0, len(paths), DECODE_CHUNK)
    workers = max(1, min(len(os.sched_getaffinity(0)), 16, len(starts)))
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        # torchvision.io warns about its deprecation on every call
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        futures = [
            pool.submit(
                _decode_chunk, paths[s : s + DECODE_CHUNK], size, out[s : s + DECODE_CHUNK]
            )
            for s in starts
        ]
        for future in futures:
            future.result()  # re-raises the DataError of an unreadable file
    return out


# --------------------------------------------------------------------------------------------
# in memory, with a cache


def _cache_file(cache_dir: Path, tree: Tree, split: str, size: int) -> tuple[Path, dict]:
    """Cache path and key: any change of root, size, file count or newest mtime misses."""
    samples = tree.samples[split]
    split_dir = tree.root / split
    dirs = [split_dir] + [split_dir / c for c in tree.classes]  # renames change directory mtimes
    newest = max(os.stat(p).st_mtime_ns for p in [*(s[0] for s in samples), *dirs])
    key = {
        "version": CACHE_VERSION,
        "root": str(tree.root),
        "split": split,
        "image_size": size,
        "num_files": len(samples),
        "newest_mtime_ns": newest,
        "classes": list(tree.classes),
    }
    root_id = hashlib.sha1(str(tree.root).encode()).hexdigest()[:8]
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    prefix = f"{tree.root.name or 'root'}-{root_id}-{split}-{size}px-"
    return cache_dir / f"{prefix}{digest}.pt", key


def _load_cache(path: Path, key: dict) -> ImageSet | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        if blob["key"] == key:
            return ImageSet(blob["x"], blob["y"])
        log.warning("ignoring cache %s: it was made for other files", path)
    except Exception as exc:  # a truncated or foreign file: decode again and overwrite it
        log.warning("ignoring unreadable cache %s (%s)", path, one_line(exc))
    return None


def _save_cache(path: Path, key: dict, data: ImageSet) -> None:
    """Write atomically (temp file + os.replace) so a crash never leaves a half cache; drop the
    stale caches of the same root/split/size. A cache that can't be written is only a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"key": key, "x": data.x, "y": data.y}, fh)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is fine to share
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for old in path.parent.glob(f"{prefix}*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not write cache %s (%s): set data.cache_dir=WRITABLE_DIR", path, exc)


def load_split(tree: Tree, split: str, size: int, cache_dir: str | Path | None) -> ImageSet:
    """One split as uint8 [N, 3, size, size] + int64 labels, from the cache when it is valid."""
    samples = tree.samples[split]
    cache = None
    if cache_dir:
        cache = _cache_file(resolve_root(cache_dir), tree, split, size)
        hit = _load_cache(*cache)
        if hit is not None:
            log.info("%s/%s: %d images from cache %s", tree.root, split, len(samples), cache[0])
            return hit
    t0 = time.perf_counter()
    log.info("%s/%s: decoding %d images (cached for later runs)", tree.root, split, len(samples))
    data = ImageSet(
        decode_files([p for p, _ in samples], size),
        torch.tensor([label for _, label in samples], dtype=torch.int64),
    )
    log.info("%s/%s: decoded in %.1f s", tree.root, split, time.perf_counter() - t0)
    if cache is not None:
        _save_cache(cache[0], cache[1], data)
    return data


def load_in_memory(
    root: Path, size: int, cache_dir: str | Path | None, tree: Tree | None = None
) -> tuple[ImageSet, ImageSet, tuple[str, ...]]:
    """Train and test splits of an ImageFolder tree, decoded (or loaded from cache)."""
    tree = tree or scan(root)
    train = load_split(tree, "train", size, cache_dir)
    val = load_split(tree, "test", size, cache_dir)
    return train, val, tree.classes


# --------------------------------------------------------------------------------------------
# streaming


class _EpochBatchSampler(Sampler):
    """Batches of (index, per-sample seed), shuffled from (seed, epoch) when training.

    The per-sample seed makes the random crop/flip of each image reproducible no matter which
    worker decodes it, or how many workers there are.
    """

    def __init__(self, n: int, batch_size: int, *, train: bool, seed: int):
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.epoch = 0
        self.rank, self.world = 0, 1  # set by StreamingLoader.shard for data-parallel training
        self.start_batch = 0  # set by StreamingLoader.set_epoch to resume mid-epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.train else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        if self.train:
            gen = epoch_generator(self.seed, self.epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
            seeds = torch.randint(0, 2**62, (self.n,), generator=gen).tolist()
        else:
            # fixed shuffle: a limit_val_batches prefix must sample every class, not the first
            order = val_order(self.n).tolist()
            seeds = [None] * self.n
        part = self.batch_size // self.world if self.train else self.batch_size
        for b in range(self.start_batch if self.train else 0, len(self)):
            start = b * self.batch_size + (self.rank * part if self.train else 0)
            sl = slice(start, start + part)
            yield list(zip(order[sl], seeds[sl]))


class _Unreadable(NamedTuple):
    """Stands in for a sample (and then its batch) whose image could not be read."""

    message: str


class _FolderDataset(Dataset):
    """ImageFolder samples -> (uint8 [3, S, S], label); uint8 keeps worker-to-main traffic small.

    A file that fails to load becomes an `_Unreadable` value rather than an exception: the main
    process then raises a clean DataError, and the workers stay healthy (a worker exception
    leaves DataLoader waiting 5 s per worker at shutdown).
    """

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int | None]):
        index, sample_seed = item
        path, label = self.samples[index]
        try:
            img = default_loader(path)
        except Exception as exc:
            return _Unreadable(str(_unreadable(path, exc)))
        if sample_seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):  # torchvision transforms draw from the global RNG
            torch.manual_seed(sample_seed)
            return self.transform(img), label


def _collate(samples: list):
    """default_collate, unless a sample is unreadable: then the batch is that `_Unreadable`."""
    broken = next((s for s in samples if isinstance(s, _Unreadable)), None)
    return broken if broken is not None else default_collate(samples)


class StreamingLoader:
    """Decodes batches from disk in DataLoader workers; yields normalized (x, y) on `device`."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform,
        batch_size: int,
        normalizer: Normalizer,
        device: torch.device,
        *,
        train: bool,
        num_workers: int,
        seed: int = 0,
    ):
        self.sampler = _EpochBatchSampler(len(samples), batch_size, train=train, seed=seed)
        self.batch_size = batch_size
        self.normalizer, self.device, self.train = normalizer, device, train
        # Workers start per epoch (not persistent): an epoch left mid-way (an error, a break)
        # stops its workers at once, where a persistent pool kept alive by a traceback took
        # 5 s per worker to shut down.
        self.loader = DataLoader(
            _FolderDataset(samples, transform),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            collate_fn=_collate,
        )

    @property
    def num_samples(self) -> int:
        return self.sampler.n

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.sampler.start_batch = int(start_batch)

    def shard(self, rank: int, world: int) -> None:
        """Training batches: decode and yield only this process's slice of every global batch."""
        self.sampler.rank, self.sampler.world = rank, world

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            if isinstance(batch, _Unreadable):
                raise DataError(batch.message)
            x, y = batch
            x = x.to(self.device, non_blocking=True)
            yield self.normalizer(x), y.to(self.device, non_blocking=True)


def _streaming_bundle(tree: Tree, size: int, cfg, device: torch.device, seed: int) -> DataBundle:
    batch_size = batch_size_of(cfg)
    train_samples, val_samples = tree.samples["train"], tree.samples["test"]
    if len(train_samples) < batch_size:
        raise ConfigError(
            f"imagefolder: data.batch_size={batch_size} is larger than the training set "
            f"({len(train_samples)} images): set data.batch_size<={len(train_samples)}"
        )
    # Mean/std from a fixed subset of training images (decoding all of ImageNet would take long).
    pick = torch.randperm(len(train_samples), generator=torch.Generator().manual_seed(0))
    subset = [train_samples[i][0] for i in pick[:STATS_SAMPLES].tolist()]
    mean, std = channel_stats(decode_files(subset, size))
    normalizer = Normalizer(mean, std, device)
    eval_tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    train_tf = (
        T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])
        if cfg.augment
        else eval_tf
    )
    workers = int(cfg.num_workers)
    common = dict(batch_size=batch_size, normalizer=normalizer, device=device, num_workers=workers)
    return DataBundle(
        name="imagefolder",
        train=StreamingLoader(train_samples, train_tf, train=True, seed=seed, **common),
        val=StreamingLoader(val_samples, eval_tf, train=False, **common),
        in_channels=3,
        num_classes=len(tree.classes),
        image_size=size,
        num_train=len(train_samples),
        num_val=len(val_samples),
        classes=tree.classes,
        mean=tuple(mean),
        std=tuple(std),
    )


# --------------------------------------------------------------------------------------------


def _in_memory_choice(cfg, n_images: int, size: int) -> bool:
    """Resolve data.in_memory (auto | true | false) for a set of n_images at size x size."""
    choice = cfg.get("in_memory", "auto")
    if isinstance(choice, str):
        choice = {"true": True, "false": False}.get(choice.lower(), choice.lower())
    nbytes = n_images * 3 * size * size
    budget = float(cfg.get("max_memory_gb", 4.0)) * 1e9
    if choice == "auto":
        return nbytes <= budget
    if not isinstance(choice, bool):
        raise ConfigError(f"data.in_memory must be auto, true or false, got {choice!r}")
    if choice and nbytes > budget:
        log.warning(
            "imagefolder: in_memory=true holds %.1f GB, above max_memory_gb", nbytes / 1e9
        )
    return choice


def build_imagefolder(cfg, device: torch.device, seed: int) -> DataBundle:
    """Any ImageFolder tree at data.root, resized to data.image_size; see the module docstring."""
    size = cfg.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.image_size must be a positive integer, got {size!r}")
    tree = scan(resolve_root(cfg.root))
    n_images = len(tree.samples["train"]) + len(tree.samples["test"])
    if not _in_memory_choice(cfg, n_images, size):
        log.info("imagefolder: streaming %d images from %s", n_images, tree.root)
        return _streaming_bundle(tree, size, cfg, device, seed)
    cache_dir = cfg.get("cache_dir", None)
    train, val, classes = load_in_memory(tree.root, size, cache_dir, tree)
    return in_memory_bundle(
        "imagefolder", train, val, cfg, device, seed, num_classes=len(classes), classes=classes
    )
