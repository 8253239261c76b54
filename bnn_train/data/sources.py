"""In-memory data sources: scikit-learn digits, MNIST, CIFAR-10 and a generated synthetic set.

Each builder turns `cfg.data` into a DataBundle; missing data is a one-line DataError that says
where we looked and how to fix it (torchvision's own errors never reach the user).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import numpy as np
import torch

from bnn_train.errors import ConfigError, DataError

from . import imagefolder
from .common import ROOT_FIX, DataBundle, ImageSet, in_memory_bundle, one_line, resolve_root

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # how long we wait to learn that a download host is unreachable
SOCKET_TIMEOUT_S = 15.0  # a stalled download fails after this instead of hanging forever

# --------------------------------------------------------------------------------------------
# downloads


def network_error(urls: list[str], timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if any of `urls` answers an HTTP HEAD request, else why not.

    torchvision's downloader calls urlopen without a timeout: where packets are dropped it would
    hang for minutes per mirror. Probing first (in a thread, so even a slow DNS lookup is
    bounded) fails fast and keeps torchvision from creating empty folders.
    """
    reasons: list[str] = []

    def probe() -> None:
        for url in urls:
            try:
                urlopen(Request(url, method="HEAD"), timeout=timeout).close()
            except HTTPError:
                pass  # the server answered (403, 404, ...): the network works
            except Exception as exc:  # URLError, timeouts, TLS errors
                cause = exc.reason if isinstance(exc, URLError) else exc
                reasons.append(f"{urlparse(url).hostname}: {one_line(cause)}")
                continue
            reasons.clear()
            return

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout * len(urls) + 1.0)
    if thread.is_alive():
        return f"no answer from {', '.join(urlparse(u).hostname or u for u in urls)}"
    return "; ".join(reasons) or None


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _torchvision_split(
    what: str, factory: Callable[[bool], tuple], where: str, holding: str, urls: list[str], cfg
) -> tuple:
    """Load the train and test splits of a torchvision dataset, downloading only if missing.

    `where` is the path torchvision reads, `holding` what a valid data.root contains.
    """
    try:
        return factory(False)  # a local copy wins: no network probe when the data is there
    except Exception:  # torchvision raises RuntimeError for missing or corrupt files
        pass
    if not cfg.download:
        raise DataError(
            f"{what} not found (or incomplete) at {where}: {ROOT_FIX} to a folder holding "
            f"{holding}, or data.download=true"
        )
    reason = network_error(urls)
    if reason is None:
        try:
            log.info("%s: downloading to %s", what, where)
            with _socket_timeout(SOCKET_TIMEOUT_S):
                return factory(True)
        except Exception as exc:  # RuntimeError, URLError, OSError, tarfile errors, ...
            reason = one_line(exc)
    raise DataError(
        f"{what} not found at {where} and the download failed ({reason}): "
        f"{ROOT_FIX} to a folder holding a local copy ({holding})"
    )


# --------------------------------------------------------------------------------------------
# sources

# Synthetic set difficulty, tuned so that at noise 0.5 a small MLP (float or binary) reaches
# >95% val accuracy in one epoch of the default config and a small global-pooling CNN ~60%
# (>90% after three); at noise 1.0 the MLPs stay around 75-90%.
SYNTH_SIGNAL = 0.1  # amplitude of the class prototypes relative to unit pixel noise
SYNTH_COLOR = 1.5  # per-class channel offset, relative to the spatial pattern


def build_digits(cfg, device: torch.device, seed: int) -> DataBundle:
    """scikit-learn's 8x8 digits (values 0..16, scaled to 0..255); fixed 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    # The split must not move with the run seed, or val accuracy would not be comparable.
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    n_train = round(0.8 * len(y))
    train, val = perm[:n_train], perm[n_train:]
    return in_memory_bundle(
        "digits",
        ImageSet(x[train], y[train]),
        ImageSet(x[val], y[val]),
        cfg,
        device,
        seed,
        num_classes=10,
        classes=tuple(str(i) for i in range(10)),
        flip=False,  # a mirrored digit is a different (or no) digit
    )


def build_mnist(cfg, device: torch.device, seed: int) -> DataBundle:
    """torchvision MNIST at <root>/MNIST/raw; 60000 train / 10000 test, 1x28x28."""
    from torchvision.datasets import MNIST

    root = resolve_root(cfg.root)

    def factory(download: bool):
        return (
            MNIST(str(root), train=True, download=download),
            MNIST(str(root), train=False, download=download),
        )

    urls = [m + MNIST.resources[0][0] for m in MNIST.mirrors]
    t0 = time.perf_counter()
    where = root / "MNIST" / "raw"
    train, test = _torchvision_split("MNIST", factory, str(where), "MNIST/raw/*-ubyte", urls, cfg)
    log.info("mnist: loaded from %s in %.1f s", where, time.perf_counter() - t0)
    return in_memory_bundle(
        "mnist",
        ImageSet(train.data.unsqueeze(1).contiguous(), train.targets.long()),
        ImageSet(test.data.unsqueeze(1).contiguous(), test.targets.long()),
        cfg,
        device,
        seed,
        num_classes=10,
        classes=tuple(str(i) for i in range(10)),
        flip=False,
    )


def build_cifar10(cfg, device: torch.device, seed: int) -> DataBundle:
    """CIFAR-10 from torchvision's <root>/cifar-10-batches-py, or an ImageFolder copy at root.

    The ImageFolder copy (<root>/train/<class>/*, <root>/test/<class>/*) is decoded once and
    cached like `data=imagefolder` (cache_dir: data.cache_dir, else BNN_CACHE_DIR, else
    data/.cache).
    """
    from torchvision.datasets import CIFAR10

    root = resolve_root(cfg.root)
    batches = root / CIFAR10.base_folder
    if not batches.is_dir() and (root / "train").is_dir() and (root / "test").is_dir():
        cache_dir = cfg.get("cache_dir") or imagefolder.default_cache_dir()
        train, val, classes = imagefolder.load_in_memory(root, 32, cache_dir)
        if len(classes) != 10:
            log.warning("cifar10: %s has %d classes, not 10", root, len(classes))
        return in_memory_bundle(
            "cifar10", train, val, cfg, device, seed, num_classes=len(classes), classes=classes
        )

    def factory(download: bool):
        return (
            CIFAR10(str(root), train=True, download=download),
            CIFAR10(str(root), train=False, download=download),
        )

    where = f"{batches} (nor {root}/train/<class>/, {root}/test/<class>/)"
    holding = f"{CIFAR10.base_folder}/ or an ImageFolder copy train/<class>/*, test/<class>/*"
    train, test = _torchvision_split("CIFAR-10", factory, where, holding, [CIFAR10.url], cfg)

    def to_set(ds) -> ImageSet:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return ImageSet(x, torch.tensor(ds.targets, dtype=torch.int64))

    return in_memory_bundle(
        "cifar10",
        to_set(train),
        to_set(test),
        cfg,
        device,
        seed,
        num_classes=10,
        classes=tuple(train.classes),
    )


def make_synthetic(
    num_classes: int, channels: int, image_size: int, train_size: int, val_size: int, noise: float
) -> tuple[ImageSet, ImageSet]:
    """Class prototypes plus Gaussian pixel noise, as uint8; the same for the same arguments.

    A prototype is a smooth random pattern (a 4x4 grid upsampled, unit contrast) plus a random
    per-class colour; a sample is 0.1 x its class prototype plus `noise` x N(0, 1) per pixel,
    scaled to a pixel std of ~40 grey levels around mid-grey. Labels are balanced.
    """
    if num_classes < 2 or min(channels, image_size, train_size, val_size) < 1 or noise < 0:
        raise ConfigError(
            "data=synthetic needs num_classes>=2, channels, image_size, train_size, val_size >= 1 "
            "and noise >= 0"
        )
    # Seed 0 for the data itself, independent of the run seed: every run sees the same set.
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(num_classes, channels, 4, 4, generator=gen)
    protos = torch.nn.functional.interpolate(
        grid, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    protos = protos / protos.std(dim=(1, 2, 3), keepdim=True)  # unit contrast per class
    # A per-class colour (channel offset) too: global-average-pooling CNNs see it at once, while
    # the spatial pattern is what an MLP picks up first.
    protos = protos + SYNTH_COLOR * torch.randn(num_classes, channels, 1, 1, generator=gen)

    # Pixel std ~40 grey levels whatever the noise: little clipping, little quantization.
    scale = 40.0 / (SYNTH_SIGNAL**2 * (1 + SYNTH_COLOR**2) + noise**2) ** 0.5

    def sample(n: int) -> ImageSet:
        y = torch.arange(n) % num_classes  # balanced classes
        y = y[torch.randperm(n, generator=gen)]
        eps = torch.randn(n, channels, image_size, image_size, generator=gen)
        x = 127.5 + scale * (SYNTH_SIGNAL * protos[y] + noise * eps)
        return ImageSet(x.round().clamp(0, 255).to(torch.uint8), y)

    return sample(train_size), sample(val_size)


def build_synthetic(cfg, device: torch.device, seed: int) -> DataBundle:
    """Generated prototypes + noise set (see `make_synthetic`); no files, no network."""
    train, val = make_synthetic(
        int(cfg.num_classes),
        int(cfg.channels),
        int(cfg.image_size),
        int(cfg.train_size),
        int(cfg.val_size),
        float(cfg.noise),
    )
    return in_memory_bundle(
        "synthetic",
        train,
        val,
        cfg,
        device,
        seed,
        num_classes=int(cfg.num_classes),
        classes=tuple(str(i) for i in range(int(cfg.num_classes))),
        flip=False,  # prototypes are not mirror-symmetric: a flip would change the class signal
    )
