"""Tests of bnn_train.data: loaders, augmentation, normalization, every source and its errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bnn_train.data import BUILDERS, build_data, imagefolder, sources
from bnn_train.data.common import val_order
from bnn_train.data.loaders import Augment, TensorLoader, channel_stats, random_crop, random_flip
from bnn_train.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MNIST_RAW = SHARED_DATA / "MNIST" / "raw"
CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg"
CLASSES = ("ant", "bee", "cat")


def data_cfg(name: str, **overrides):
    """configs/data/<name>.yaml with overrides, as the trainer would pass cfg.data."""
    cfg = OmegaConf.load(REPO / "configs" / "data" / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_one_line_error(exc_info, *fragments) -> None:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, message


# ------------------------------------------------------------------------------------------
# registry, shapes, determinism


def test_every_data_config_has_a_builder():
    names = {OmegaConf.load(p).name for p in (REPO / "configs" / "data").glob("*.yaml")}
    assert names == set(BUILDERS)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError) as exc_info:
        build_data(OmegaConf.create({"name": "imagenet21k"}))
    assert_one_line_error(exc_info, "imagenet21k", *sorted(BUILDERS))


def test_digits_shapes_dtypes_and_len():
    bundle = build_data(data_cfg("digits"), device=torch.device("cpu"), seed=0)
    assert (bundle.name, bundle.in_channels, bundle.num_classes, bundle.image_size) == (
        "digits",
        1,
        10,
        8,
    )
    assert (bundle.num_train, bundle.num_val) == (1438, 359)
    assert len(bundle.train) == 1438 // 64  # drops the last partial batch
    assert len(bundle.val) == -(-359 // 64)  # keeps it
    train = batches(bundle.train)
    val = batches(bundle.val)
    assert len(train) == len(bundle.train) and len(val) == len(bundle.val)
    x, y = train[0]
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.shape == (64,) and y.dtype == torch.int64
    assert all(len(y) == 64 for _, y in train)
    assert len(val[-1][1]) == 359 - 5 * 64
    assert sum(len(y) for _, y in val) == 359
    # held once, as uint8
    assert bundle.train.x.dtype == torch.uint8 and bundle.train.x.shape == (1438, 1, 8, 8)
    assert bundle.train.x.max() == 255


def test_digits_split_does_not_depend_on_the_run_seed():
    a = build_data(data_cfg("digits"), seed=0)
    b = build_data(data_cfg("digits"), seed=123)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.val.y, b.val.y)
    assert torch.equal(a.train.x, b.train.x)
    # val batches are in a fixed order
    for (xa, ya), (xb, yb) in zip(a.val, b.val):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_synthetic_shapes_and_fixed_data():
    cfg = data_cfg("synthetic")
    bundle = build_data(cfg, seed=0)
    assert (bundle.in_channels, bundle.num_classes, bundle.image_size) == (3, 10, 16)
    assert (bundle.num_train, bundle.num_val) == (1024, 256)
    assert len(bundle.train) == 16 and len(bundle.val) == 4
    x, y = next(iter(bundle.train))
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.max()) < 10
    other = build_data(cfg, seed=7)  # the data is generated from a fixed generator
    assert torch.equal(bundle.train.x, other.train.x) and torch.equal(bundle.val.y, other.val.y)
    assert torch.bincount(bundle.train.y).tolist() == [103] * 4 + [102] * 6  # balanced


def test_synthetic_is_learnable_but_noise_matters():
    """A nearest-class-mean classifier fit on train: near perfect at noise 0.5, worse at 2."""

    def accuracy(noise):
        train, val = sources.make_synthetic(10, 3, 16, 1024, 256, noise)
        xt, xv = train.x.float().flatten(1), val.x.float().flatten(1)
        means = torch.stack([xt[train.y == c].mean(0) for c in range(10)])
        return (torch.cdist(xv, means).argmin(1) == val.y).float().mean().item()

    easy, hard = accuracy(0.5), accuracy(2.0)
    assert easy > 0.9
    assert 0.1 < hard < easy


def test_set_epoch_is_deterministic():
    cfg = data_cfg("synthetic", augment=True)
    a = build_data(cfg, seed=0)
    b = build_data(cfg, seed=0)
    a.train.set_epoch(3)
    b.train.set_epoch(3)
    first, again, other_run = batches(a.train), batches(a.train), batches(b.train)
    for (x1, y1), (x2, y2), (x3, y3) in zip(first, again, other_run):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1, x3) and torch.equal(y1, y3)
    a.train.set_epoch(4)
    next_epoch = batches(a.train)
    assert not torch.equal(first[0][1], next_epoch[0][1])
    # each epoch is a permutation of the whole set (minus the dropped partial batch)
    ys = torch.cat([y for _, y in next_epoch])
    assert len(ys) == len(a.train) * 64
    c = build_data(cfg, seed=1)
    c.train.set_epoch(3)
    assert not torch.equal(first[0][1], next(iter(c.train))[1])


def test_val_has_no_augmentation():
    plain = build_data(data_cfg("synthetic", augment=False))
    augmented = build_data(data_cfg("synthetic", augment=True))
    for (xa, ya), (xb, yb) in zip(plain.val, augmented.val):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ------------------------------------------------------------------------------------------
# augmentation and normalization


def test_random_crop_shape_padding_and_identity():
    x = torch.arange(1, 1 + 2 * 2 * 4 * 4, dtype=torch.int64).view(2, 2, 4, 4).to(torch.uint8)
    pad = 2
    centre = random_crop(x, pad, torch.tensor([[pad, pad], [pad, pad]]))
    assert torch.equal(centre, x)  # offset == pad is the identity
    out = random_crop(x, pad, torch.tensor([[0, 0], [2 * pad, 1]]))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # image 0 shifted down-right by 2: two zero rows and columns at top-left
    assert (out[0, :, :pad, :] == 0).all() and (out[0, :, :, :pad] == 0).all()
    assert torch.equal(out[0, :, pad:, pad:], x[0, :, : 4 - pad, : 4 - pad])
    # image 1: rows shifted up by 2 (zeros at the bottom), columns right by 1
    assert (out[1, :, 4 - pad :, :] == 0).all() and (out[1, :, :, 0] == 0).all()
    assert torch.equal(out[1, :, : 4 - pad, 1:], x[1, :, pad:, :3])


def test_random_flip_mirrors_only_selected_images():
    x = torch.tensor([[[[1, 2, 3], [4, 5, 6]]], [[[7, 8, 9], [10, 11, 12]]]], dtype=torch.uint8)
    out = random_flip(x, torch.tensor([True, False]))
    assert out[0, 0].tolist() == [[3, 2, 1], [6, 5, 4]]
    assert torch.equal(out[1], x[1])


def test_augment_draws_valid_offsets_and_respects_flip_flag():
    gen = torch.Generator().manual_seed(0)
    offsets, flips = Augment(pad=4).draw(1000, gen)
    assert offsets.shape == (1000, 2) and 0 <= offsets.min() and offsets.max() <= 8
    assert 300 < int(flips.sum()) < 700
    _, no_flips = Augment(pad=1, flip=False).draw(100, gen)
    assert not no_flips.any()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    assert Augment(pad=4)(x, *Augment(pad=4).draw(8, gen)).shape == x.shape


def test_channel_stats_are_exact():
    x = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=7)
    xf = x.double() / 255
    assert np.allclose(mean, xf.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(std, xf.std(dim=(0, 2, 3), unbiased=False).numpy())


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_normalized_training_set_has_zero_mean_unit_std(name):
    bundle = build_data(data_cfg(name))
    x = bundle.train.normalizer(bundle.train.x)  # the whole train split, un-augmented
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(bundle.in_channels), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(bundle.in_channels), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_and_data_live_on_the_device():
    device = torch.device("cuda")
    bundle = build_data(data_cfg("synthetic", augment=True), device=device)
    assert bundle.train.x.device.type == "cuda" and bundle.train.x.dtype == torch.uint8
    x, y = next(iter(bundle.train))
    assert x.device.type == "cuda" and y.device.type == "cuda"
    cpu = build_data(data_cfg("synthetic", augment=True), device=torch.device("cpu"))
    xc, yc = next(iter(cpu.train))  # same randomness on any device
    assert torch.equal(y.cpu(), yc) and torch.allclose(x.cpu(), xc, atol=1e-5)


# ------------------------------------------------------------------------------------------
# imagefolder


def _write_image(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = np.clip(value + rng.integers(-20, 20, shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode).save(path)


@pytest.fixture
def tree(tmp_path) -> Path:
    """<tmp>/tree/{train,test}/{ant,bee,cat}: PNG and JPEG, various sizes, one grayscale."""
    root = tmp_path / "tree"
    for split, n in (("train", 6), ("test", 3)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                ext = ".png" if i % 2 else ".jpg"
                size = (12, 10) if i % 3 == 0 else (8, 8)
                mode = "L" if (i == 1 and c == 0) else "RGB"
                _write_image(root / split / name / f"{i}{ext}", size, 40 + 80 * c, mode)
    (root / "train" / "README.txt").write_text("not an image, not a class: ignored")
    return root


def _folder_cfg(root: Path, cache: Path, **overrides):
    settings = dict(root=str(root), cache_dir=str(cache), image_size=8, batch_size=4, num_workers=0)
    settings.update(overrides)
    return data_cfg("imagefolder", **settings)


def test_imagefolder_in_memory_and_cache_reuse(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    bundle = build_data(_folder_cfg(tree, cache, in_memory=True))
    assert bundle.classes == CLASSES and bundle.num_classes == 3 and bundle.in_channels == 3
    assert (bundle.num_train, bundle.num_val, bundle.image_size) == (18, 9, 8)
    assert bundle.train.x.shape == (18, 3, 8, 8) and bundle.train.x.dtype == torch.uint8
    assert bundle.train.y.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # ImageFolder order
    assert len(bundle.train) == 4 and len(bundle.val) == 3
    x, y = next(iter(bundle.train))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    # class brightness survives decoding and resizing: class c is ~40 + 80c grey
    means = [bundle.val.x[bundle.val.y == c].float().mean().item() for c in range(3)]
    assert means == sorted(means) and abs(means[0] - 40) < 10 and abs(means[2] - 200) < 10
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 2 and all(p.endswith(".pt") for p in cached)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(imagefolder, "decode_files", no_decoding)
    again = build_data(_folder_cfg(tree, cache, in_memory=True))
    assert torch.equal(again.train.x, bundle.train.x) and torch.equal(again.val.y, bundle.val.y)

    # a new file invalidates that split's cache (and the stale cache is removed)
    monkeypatch.undo()
    _write_image(tree / "train" / "bee" / "new.png", (8, 8), 120)
    grown = build_data(_folder_cfg(tree, cache, in_memory=True))
    assert grown.num_train == 19
    assert len(list(cache.iterdir())) == 2


def test_imagefolder_auto_chooses_by_memory(tree, tmp_path):
    small = build_data(_folder_cfg(tree, tmp_path / "c", in_memory="auto", max_memory_gb=1.0))
    assert isinstance(small.train, TensorLoader)
    big = build_data(_folder_cfg(tree, tmp_path / "c", in_memory="auto", max_memory_gb=1e-9))
    assert isinstance(big.train, imagefolder.StreamingLoader)


def test_imagefolder_streaming(tree, tmp_path):
    cfg = _folder_cfg(tree, tmp_path / "cache", in_memory=False, augment=True)
    bundle = build_data(cfg, seed=0)
    assert isinstance(bundle.train, imagefolder.StreamingLoader)
    assert bundle.classes == CLASSES and (bundle.num_train, bundle.num_val) == (18, 9)
    assert len(bundle.train) == 4 and len(bundle.val) == 3
    train = batches(bundle.train)
    assert len(train) == 4 and all(x.shape == (4, 3, 8, 8) for x, _ in train)
    assert train[0][0].dtype == torch.float32 and train[0][1].dtype == torch.int64
    val = batches(bundle.val)
    assert [len(y) for _, y in val] == [4, 4, 1]
    assert sorted(torch.cat([y for _, y in val]).tolist()) == [0] * 3 + [1] * 3 + [2] * 3  # all of val, once
    assert not (tmp_path / "cache").exists()  # streaming never writes a cache
    # same epoch -> same batches (augmentation included); next epoch -> another order
    for (x1, y1), (x2, y2) in zip(train, batches(bundle.train)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    bundle.train.set_epoch(1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(train, batches(bundle.train)))


def test_imagefolder_streaming_workers_match_main_process(tree, tmp_path):
    """Per-sample seeds make worker processes give exactly the batches of num_workers=0."""
    cfg = _folder_cfg(tree, tmp_path / "c", in_memory=False, augment=True)
    solo = build_data(cfg, seed=5)
    pooled = build_data(_folder_cfg(tree, tmp_path / "c", in_memory=False, num_workers=2), seed=5)
    for (x1, y1), (x2, y2) in zip(batches(solo.train), batches(pooled.train)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def _error_of(cfg) -> pytest.ExceptionInfo:
    with pytest.raises(DataError) as exc_info:
        bundle = build_data(cfg)
        batches(bundle.train)  # streaming finds unreadable images only while loading
    return exc_info


@pytest.mark.parametrize("in_memory", [True, False])
def test_imagefolder_errors(tree, tmp_path, in_memory):
    cache = tmp_path / "cache"

    def error(root):
        return _error_of(_folder_cfg(root, cache, in_memory=in_memory))

    missing = tmp_path / "nowhere"
    assert_one_line_error(error(missing), missing, "data.root")

    no_test = tmp_path / "no_test"
    (no_test / "train" / "ant").mkdir(parents=True)
    assert_one_line_error(error(no_test), no_test / "test", "data.root")

    no_classes = tmp_path / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "test").mkdir()
    assert_one_line_error(error(no_classes), no_classes / "train", "<class>")

    (tree / "test" / "dog").mkdir()
    assert_one_line_error(error(tree), tree / "train", tree / "test", "only in test: dog")
    (tree / "train" / "dog").mkdir()
    assert_one_line_error(error(tree), tree / "train" / "dog", "no images")
    (tree / "train" / "dog").rmdir()
    (tree / "test" / "dog").rmdir()

    bad = tree / "train" / "bee" / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    assert_one_line_error(error(tree), bad, "cannot read image")


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_streaming_unreadable_image(tree, tmp_path, workers):
    """An image that breaks after start-up fails while loading, still as one DataError line."""
    bundle = build_data(_folder_cfg(tree, tmp_path, in_memory=False, num_workers=workers))
    bad = tree / "test" / "cat" / "1.png"
    bad.write_bytes(b"truncated")
    with pytest.raises(DataError) as exc_info:
        batches(bundle.val)
    assert_one_line_error(exc_info, bad, "cannot read image")


def test_imagefolder_bad_in_memory_value(tree, tmp_path):
    with pytest.raises(ConfigError):
        build_data(_folder_cfg(tree, tmp_path, in_memory="sometimes"))


def test_batch_size_larger_than_training_set(tree, tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        build_data(_folder_cfg(tree, tmp_path, in_memory=True, batch_size=100))


# ------------------------------------------------------------------------------------------
# MNIST and CIFAR-10: missing data never reaches the network for long


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(sources, "network_error", lambda urls, timeout=0: "offline (test)")


@pytest.mark.parametrize(
    "name, looked_at", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")]
)
def test_missing_torchvision_data_without_download(tmp_path, name, looked_at):
    exc_info = _error_of(data_cfg(name, root=str(tmp_path), download=False))
    assert_one_line_error(exc_info, tmp_path / looked_at, "data.root", "data.download=true")


@pytest.mark.parametrize(
    "name, looked_at", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")]
)
def test_missing_torchvision_data_when_offline(tmp_path, offline, monkeypatch, name, looked_at):
    import torchvision

    def no_download(self):  # torchvision's urlopen has no timeout: offline it would hang
        raise AssertionError("torchvision download attempted although the probe found no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_download)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_download)
    exc_info = _error_of(data_cfg(name, root=str(tmp_path), download=True))
    assert_one_line_error(exc_info, tmp_path / looked_at, "download failed", "offline", "data.root")
    assert list(tmp_path.iterdir()) == []  # no empty folders left behind


def test_failing_torchvision_download_becomes_data_error(tmp_path, monkeypatch):
    import torchvision

    def broken_download(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried a mirror")

    monkeypatch.setattr(sources, "network_error", lambda urls, timeout=0: None)
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", broken_download)
    exc_info = _error_of(data_cfg("mnist", root=str(tmp_path), download=True))
    assert_one_line_error(exc_info, tmp_path / "MNIST" / "raw", "download failed", "train-images")


def test_network_probe_is_bounded(monkeypatch):
    """A request that never answers: the probe gives up on it instead of waiting for it."""
    entered, release = threading.Event(), threading.Event()

    def hang(*args, **kwargs):
        entered.set()
        release.wait(30)

    monkeypatch.setattr(sources, "urlopen", hang)
    try:
        reason = sources.network_error(["https://example.invalid/x"], timeout=0.2)
        assert entered.is_set() and not release.is_set()  # returned while the request still hangs
    finally:
        release.set()
    assert reason == "no answer from example.invalid"


def test_cifar10_from_torchvision_batches(tmp_path, monkeypatch):
    """The torchvision layout (pickled batches, NHWC in .data) arrives as NCHW uint8."""
    import pickle

    import torchvision

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(0)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in files:
        data = rng.integers(0, 256, (8, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B
        data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30
        blob = {"data": data, "labels": list(range(8))}
        (batches / name).write_bytes(pickle.dumps(blob))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (batches / "batches.meta").write_bytes(pickle.dumps(meta))
    # the files are fakes: skip torchvision's md5 checks
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    bundle = build_data(data_cfg("cifar10", root=str(tmp_path), batch_size=8, download=False))
    assert (bundle.num_train, bundle.num_val, bundle.in_channels, bundle.image_size) == (
        40,
        8,
        3,
        32,
    )
    assert bundle.classes[0] == "class0" and len(bundle.train) == 5
    first = bundle.val.x[val_order(len(bundle.val.y)).argsort()[0]]  # source image 0
    assert first.shape == (3, 32, 32) and [int(first[c, 5, 7]) for c in range(3)] == [10, 20, 30]


@pytest.mark.skipif(not MNIST_RAW.is_dir(), reason=f"no offline MNIST at {MNIST_RAW}")
def test_mnist_from_shared_data():
    bundle = build_data(data_cfg("mnist", root=str(SHARED_DATA), download=True))
    assert (bundle.num_train, bundle.num_val, bundle.in_channels, bundle.image_size) == (
        60000,
        10000,
        1,
        28,
    )
    assert len(bundle.train) == 600 and len(bundle.val) == 100
    assert abs(bundle.mean[0] - 0.1307) < 1e-3 and abs(bundle.std[0] - 0.3081) < 1e-3
    x, _ = next(iter(bundle.val))
    y_source_order = bundle.val.y[val_order(10000).argsort()]
    assert x.shape == (100, 1, 28, 28) and y_source_order[:5].tolist() == [7, 2, 1, 0, 4]


@pytest.mark.skipif(not CIFAR_JPEG.is_dir(), reason=f"no offline CIFAR-10 at {CIFAR_JPEG}")
def test_cifar10_from_imagefolder_copy_subset(tmp_path):
    """data=cifar10 on an ImageFolder root: 20 train / 5 test real JPEGs per class (symlinks)."""
    root = tmp_path / "cifar_subset"
    for split, n in (("train", 20), ("test", 5)):
        for class_dir in sorted((CIFAR_JPEG / split).iterdir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for f in sorted(class_dir.iterdir())[:n]:
                (root / split / class_dir.name / f.name).symlink_to(f)
    cfg = data_cfg("cifar10", root=str(root), batch_size=50, cache_dir=str(tmp_path / "cache"))
    bundle = build_data(cfg)
    assert bundle.classes[:3] == ("airplane", "automobile", "bird") and bundle.num_classes == 10
    assert (bundle.num_train, bundle.num_val, bundle.image_size) == (200, 50, 32)
    x, y = next(iter(bundle.train))
    assert x.shape == (50, 3, 32, 32) and y.dtype == torch.int64
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPEG.is_dir(), reason=f"no offline CIFAR-10 at {CIFAR_JPEG}")
def test_cifar10_full_jpeg_copy_decodes_then_loads_from_cache(tmp_path, monkeypatch):
    cfg = data_cfg("cifar10", root=str(CIFAR_JPEG), cache_dir=str(tmp_path))
    bundle = build_data(cfg)
    assert (bundle.num_train, bundle.num_val) == (50000, 10000)
    assert [round(m, 2) for m in bundle.mean] == [0.49, 0.48, 0.45]
    assert os.listdir(tmp_path)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(imagefolder, "decode_files", no_decoding)
    again = build_data(cfg)
    assert torch.equal(again.val.x, bundle.val.x) and torch.equal(again.train.y, bundle.train.y)


def test_validation_prefix_is_not_one_class():
    """limit_val_batches takes a prefix of val: it must mix classes even when the source is sorted."""
    cfg = OmegaConf.create({"name": "synthetic", "root": "data", "batch_size": 32, "num_workers": 0,
                            "download": False, "augment": False, "num_classes": 4, "channels": 1,
                            "image_size": 4, "train_size": 64, "val_size": 64, "noise": 0.1})
    from bnn_train.data.common import ImageSet, in_memory_bundle

    sorted_val = ImageSet(torch.zeros(64, 1, 4, 4, dtype=torch.uint8), torch.arange(4).repeat_interleave(16))
    bundle = in_memory_bundle("sorted", sorted_val, sorted_val, cfg, torch.device("cpu"), 0, num_classes=4)
    first_batch_labels = next(iter(bundle.val))[1]
    assert len(set(first_batch_labels.tolist())) == 4
    assert sorted(torch.cat([y for _, y in bundle.val]).tolist()) == sorted_val.y.tolist()
