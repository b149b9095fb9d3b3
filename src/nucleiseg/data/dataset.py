"""The torch dataset of training crops: sample an image, augment it, build its targets.

Each item is drawn afresh: an image is picked (uniformly, or weighted by
imaging modality), the augmentation pipeline crops and alters it together with
its label image, and the family's target function turns the augmented label
image into the training targets. Targets are built after augmentation, from
the moved label image, rather than augmenting precomputed target maps: border
widths and separations then match the crop's scale, and a label image
survives nearest-neighbour resizing intact where thin border and separation
maps would not.

Item ``i`` of epoch ``e`` depends only on ``(seed, e, i)``, so a resumed run
sees exactly the crops an uninterrupted one would, whatever the number of
DataLoader workers or the order items are asked for.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from nucleiseg.data.modality import MODALITIES
from nucleiseg.data.reading import DataError, Sample, find_images, load_sample
from nucleiseg.data.targets import make_targets

# ImageNet statistics: what pretrained encoders expect, and harmless from scratch.
IMAGE_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGE_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """The network input for an image: channels first, scaled to 0..1, normalized.

    Training and inference both go through this function, so they cannot
    disagree on the normalization: ``(image / 255 - IMAGE_MEAN) / IMAGE_STD``
    per channel.

    Args:
        image: RGB uint8 image, shape (H, W, 3).

    Returns:
        float32 tensor of shape (3, H, W).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    scaled = image.astype(np.float32) * np.float32(1 / 255)
    normalized = (scaled - IMAGE_MEAN) / IMAGE_STD
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def sample_weights(
    modalities: Sequence[str], weights: Mapping[str, float] | None = None
) -> np.ndarray:
    """Probability of drawing each image, from a relative weight per modality.

    An image's weight is its modality's entry in ``weights`` (1 when absent),
    so ``{"tissue": 2.0}`` draws each tissue image twice as often as a
    fluorescence one.

    Args:
        modalities: Modality of each image, one of
            :data:`nucleiseg.data.modality.MODALITIES`.
        weights: Modality -> relative weight; None draws images uniformly.

    Returns:
        float64 probabilities, one per image, summing to 1.

    Raises:
        ValueError: On an unknown modality, a negative weight, or when every
            image has weight 0.
    """
    weights = dict(weights or {})
    unknown = sorted((set(weights) | set(modalities)) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modality {', '.join(unknown)}; expected one of {MODALITIES}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"modality weights must not be negative, got {weights}")
    per_image = np.array([weights.get(m, 1.0) for m in modalities], dtype=np.float64)
    total = per_image.sum()
    if total <= 0:
        raise ValueError("every image has sampling weight 0")
    return per_image / total


def load_samples(root: str | Path, image_ids: Sequence[str] | None = None) -> list[Sample]:
    """Read images with their labels into memory, with a progress bar.

    Args:
        root: A folder in the competition layout, with masks.
        image_ids: Images to read, in this order; None reads all of them.

    Returns:
        One sample per image id.

    Raises:
        DataError: If an id is not under ``root`` (all missing ids are named).
    """
    paths = find_images(root)
    ids = list(paths) if image_ids is None else list(image_ids)
    missing = [i for i in ids if i not in paths]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(f"{root}: {len(missing)} image id(s) not found: {shown}")
    return [load_sample(i, paths[i]) for i in tqdm(ids, desc="loading images", unit="image")]


class NucleiDataset(Dataset):
    """Random augmented crops of labelled images, with their training targets.

    Args:
        samples: Labelled images, held in memory.
        transform: Augmentation taking ``image`` and ``mask`` (the label
            image), e.g. :func:`nucleiseg.data.augment.train_transform`. Its random
            state is reset for every item.
        samples_per_epoch: Items per epoch; each draws an image with replacement.
        target_fn: Augmented label image -> targets: an array (C, H, W),
            returned as a float32 tensor (by default the U-Net++ family's
            :func:`nucleiseg.data.targets.make_targets`), or anything the family's
            collate function takes, such as Mask R-CNN's boxes and masks.
        probabilities: Probability of drawing each sample (see
            :func:`sample_weights`); None draws uniformly.
        seed: Seed of the image draws and the augmentation.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: A.BaseCompose,
        samples_per_epoch: int,
        target_fn: Callable[[np.ndarray], np.ndarray] = make_targets,
        probabilities: np.ndarray | None = None,
        seed: int = 0,
    ):
        if not samples:
            raise ValueError("no samples to draw from")
        unlabelled = [s.image_id for s in samples if s.labels is None]
        if unlabelled:
            raise ValueError(f"samples without labels: {', '.join(unlabelled[:5])}")
        if probabilities is not None and len(probabilities) != len(samples):
            raise ValueError(f"{len(probabilities)} probabilities for {len(samples)} samples")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        if seed < 0:
            raise ValueError(f"seed must not be negative, got {seed}")
        self.samples = list(samples)
        self.transform = transform
        self.samples_per_epoch = samples_per_epoch
        self.target_fn = target_fn
        self.probabilities = probabilities
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops the items are.

        DataLoader workers hold copies of the dataset taken when iteration
        starts, so call this before iterating over the epoch, and do not use
        ``persistent_workers``, whose copies would keep the old epoch.

        Args:
            epoch: Epoch number, 0 or more.
        """
        if epoch < 0:
            raise ValueError(f"epoch must not be negative, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index`` of the current epoch.

        Args:
            index: 0 <= index < ``samples_per_epoch``.

        Returns:
            (image, targets): the :func:`to_tensor` image, float32 (3, H, W),
            and the targets (float32 (C, H, W) when ``target_fn`` gives an array).
        """
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index {index} out of range for {self.samples_per_epoch} items")
        rng = np.random.default_rng((self.seed, self.epoch, index))
        sample = self.samples[rng.choice(len(self.samples), p=self.probabilities)]
        # Both generators albumentations draws from come from this item's own
        # stream; set_random_seed would instead give every step the same seed,
        # so that steps with equal probabilities would fire together.
        self.transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        augmented = self.transform(image=sample.image, mask=sample.labels)
        # Targets come from the augmented label image, never from augmented target
        # maps, so that border widths and separations match the crop's scale.
        targets = self.target_fn(augmented["mask"])
        if isinstance(targets, np.ndarray):
            targets = torch.from_numpy(targets.astype(np.float32))
        return to_tensor(augmented["image"]), targets


class BatchShare(Dataset):
    """Two datasets of crops, each filling fixed places of every batch.

    Of every run of ``batch_size`` consecutive items (one batch of a DataLoader
    with ``shuffle=False``), the first ``per_batch`` come from ``shared`` and the
    rest from ``base``, in order; so every batch holds exactly ``per_batch``
    items of ``shared``, rather than that many on average.

    Args:
        base: Dataset of ``(batch_size - per_batch) x B`` items.
        shared: Dataset of ``per_batch x B`` items (B batches in all).
        batch_size: Items per batch.
        per_batch: Items of ``shared`` in each batch, 1 to ``batch_size - 1``.
    """

    def __init__(self, base: NucleiDataset, shared: NucleiDataset, batch_size: int, per_batch: int):
        if not 0 < per_batch < batch_size:
            raise ValueError(f"per_batch must be 1 to {batch_size - 1}, got {per_batch}")
        batches = len(shared) // per_batch
        if len(shared) != batches * per_batch or len(base) != batches * (batch_size - per_batch):
            raise ValueError(
                f"{len(base)} and {len(shared)} items do not make whole batches of "
                f"{batch_size - per_batch} + {per_batch}"
            )
        self.base, self.shared = base, shared
        self.batch_size, self.per_batch = batch_size, per_batch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of both datasets (see :meth:`NucleiDataset.set_epoch`)."""
        self.base.set_epoch(epoch)
        self.shared.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) + len(self.shared)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        batch, place = divmod(index, self.batch_size)
        if place < self.per_batch:
            return self.shared[batch * self.per_batch + place]
        rest = self.batch_size - self.per_batch
        return self.base[batch * rest + place - self.per_batch]
