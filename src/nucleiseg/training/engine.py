"""The training engine shared by the model families (see :mod:`nucleiseg.inference.family`).

One fold's run: train for the configured epochs, score the whole validation
images with the competition metric every few epochs, write the best and the
last checkpoint and one CSV row per epoch, then predict the validation images
out of fold. An interrupted run resumes from its last checkpoint and ends
exactly as an uninterrupted one would: the crops of every epoch depend only
on (seed, epoch, index), and the checkpoint holds the random state.

Started by torchrun as several processes (:mod:`nucleiseg.training.distributed`), a
fold trains with ``DistributedDataParallel``: ``batch_size`` stays the global
batch, shared equally by the processes, so the steps, the learning-rate
schedule and the crops of every step are those of one process; rank 0 alone
validates and writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from nucleiseg.atomic import write_bytes, write_text
from nucleiseg.competition.folds import fold_assignment, parse_fold_list
from nucleiseg.competition.metric import average_precision
from nucleiseg.data.augment import train_transform
from nucleiseg.data.dataset import BatchShare, NucleiDataset, load_samples, sample_weights
from nucleiseg.data.reading import Sample, find_images, labelled_root
from nucleiseg.data.sources import LoadedSource, load_source, mix_probabilities, parse_sources
from nucleiseg.inference.family import Family, get_family
from nucleiseg.locks import folder_lock
from nucleiseg.models.build import build_model, load_weights
from nucleiseg.models.compact import compact_state
from nucleiseg.models.config import TrainConfig, save_config
from nucleiseg.models.runs import (
    BEST,
    CONFIG,
    EPOCHS_CSV,
    LAST,
    WEIGHTS,
    save_weights,
    torch_bytes,
    write_int8_weights,
    write_run_info,
    write_split,
)
from nucleiseg.training import distributed

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators.

    numpy's legacy global generator is left alone: the code here draws from
    explicit ``np.random.Generator`` objects seeded per item.
    """
    random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Trainer:
    """Model, optimiser and schedule of one fold, built from the configuration.

    ``model`` is the model itself (what is validated and saved); the training
    steps go through ``train_model``, which is the same model in one process
    and its ``DistributedDataParallel`` wrapper, averaging the gradients, in
    several.
    """

    config: TrainConfig
    family: Family
    device: torch.device
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    steps_per_epoch: int

    @classmethod
    def create(cls, config: TrainConfig, device: torch.device) -> Trainer:
        family = get_family(config.model)
        seed_everything(config.seed)
        model = build_model(config).to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        train_model = model
        if distributed.world_size() > 1:
            # The wrapper copies rank 0's initial weights to every process.
            device_ids = [device.index] if device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=device_ids)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        steps_per_epoch = max(1, config.samples_per_epoch // config.batch_size)
        schedule = warmup_cosine(
            config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # Loss scaling is only needed for float16; bfloat16 has float32's range.
        scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
        return cls(
            config,
            family,
            device,
            model,
            train_model,
            optimizer,
            scheduler,
            scaler,
            steps_per_epoch,
        )

    def state(self, epoch: int, history: list[dict], best_score: float) -> dict:
        """The checkpoint: model, optimiser, schedule, history and random state.

        In several processes every process must call this (it gathers each
        one's random state, which differ once their crops draw differently
        from torch's generator, as Mask R-CNN's proposal sampling does).
        """
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "config": self.config.to_dict(),
            "seed": self.config.seed,
            "history": history,
            "best_score": best_score,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
        }
        if distributed.world_size() > 1:
            state["rank_rng"] = distributed.gather((state["torch_rng"], cuda_rng))
        return state

    def restore(self, state: dict) -> tuple[int, list[dict], float]:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch_rng, cuda_rng = state["torch_rng"], state.get("cuda_rng")
        if "rank_rng" in state and len(state["rank_rng"]) == distributed.world_size():
            torch_rng, cuda_rng = state["rank_rng"][distributed.rank()]
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(cuda_rng)
        return state["epoch"], state["history"], state["best_score"]

    def train_one_epoch(self, loader: DataLoader, epoch: int) -> float:
        """One pass over the loader; returns the mean training loss (over every process)."""
        self.model.train()
        total, count = 0.0, 0
        progress = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            unit="batch",
            disable=not distributed.is_main(),
        )
        for images, targets in progress:
            images = images.to(self.device, non_blocking=True)
            if isinstance(targets, torch.Tensor):
                targets = targets.to(self.device, non_blocking=True)
            if self.config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss = self.family.training_loss(self.train_model, images, targets, self.config)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total += loss.item() * len(images)
            count += len(images)
            progress.set_postfix(loss=f"{total / count:.4f}")
        total, count = distributed.sum_over_ranks([total, count])
        return total / max(count, 1)

    def validate(
        self,
        samples: Sequence[Sample],
        on_prediction: Callable[[Sample, Any, np.ndarray], None] | None = None,
    ) -> tuple[float, float]:
        """Mean loss and mean AP (competition metric, after postprocessing) on whole images.

        Args:
            samples: Labelled whole images.
            on_prediction: Called with each sample, the family's raw output
                (the same as the family's ``predict`` gives) and its label image.
        """
        return validate(self.model, self.config, samples, self.device, on_prediction)


def validate(
    model: nn.Module,
    config: TrainConfig,
    samples: Sequence[Sample],
    device: torch.device,
    on_prediction: Callable[[Sample, Any, np.ndarray], None] | None = None,
) -> tuple[float, float]:
    """Mean loss and mean AP of a model of ``config``'s family on whole labelled images
    (see :meth:`Trainer.validate`)."""
    family = get_family(config.model)
    params = family.params(config)
    losses, scores = [], []
    for sample in tqdm(samples, desc="validate", unit="image", leave=False):
        loss, raw = family.evaluate(model, sample, config, device)
        losses.append(loss)
        labels = family.to_labels(raw, params)
        scores.append(average_precision(sample.labels, labels).score)
        if on_prediction is not None:
            on_prediction(sample, raw, labels)
    return float(np.mean(losses)), float(np.mean(scores))


def _save(state: dict, path: Path) -> None:
    # Serialized in memory, so that equal states give equal bytes, then written
    # and checked in one step.
    write_bytes(path, torch_bytes(state))


def _write_history(history: list[dict], path: Path) -> None:
    write_text(path, pd.DataFrame(history).to_csv(index=False, float_format="%.6g"))


def save_compact_weights(model: nn.Module, path: Path) -> None:
    """Model weights alone, floating-point tensors in float16, their checksum recorded."""
    save_weights(compact_state(model.state_dict(), "float16"), path)


def finish_fold(
    model: nn.Module,
    config: TrainConfig,
    val_samples: Sequence[Sample],
    out_dir: Path,
    device: torch.device,
) -> tuple[float, float]:
    """Keep a fold's model as a run commits it and predict its validation images out of fold.

    The out-of-fold predictions are made with the weights as kept (rounded to
    float16), so that the committed weights reproduce them exactly
    (scripts/predict.py --oof).

    Args:
        model: The finished model; its weights are replaced by the kept ones.
        config: Its configuration.
        val_samples: The fold's held-out images with labels.
        out_dir: Fold folder; receives weights_fp16.pt, weights_int8.pt and oof/.
        device: Where the model runs.

    Returns:
        Mean loss and mean AP on the validation images.
    """
    family = get_family(config.model)
    save_compact_weights(model, out_dir / WEIGHTS)
    write_int8_weights(out_dir)  # what the run commits
    load_weights(model, out_dir / WEIGHTS)

    def save_oof(sample: Sample, raw: Any, labels: np.ndarray) -> None:
        family.save_oof(out_dir, sample.image_id, raw, labels)

    return validate(model, config, val_samples, device, save_oof)


def train_fold(
    config: TrainConfig,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    modalities: Mapping[str, str],
    out_dir: Path,
    device: torch.device,
    resume: bool = False,
    extras: Sequence[LoadedSource] = (),
    pseudo_labelled: Sequence[Sample] = (),
    pseudo_per_batch: int = 0,
) -> nn.Module:
    """Train one fold, checkpointing every epoch, and predict its validation images.

    Args:
        config: The resolved configuration.
        train_samples: Training images with labels.
        val_samples: The fold's held-out images with labels.
        modalities: Image id -> modality, for sampling the rarer kinds more often.
        out_dir: Run folder of the fold; receives config.yaml, epochs.csv,
            last.ckpt, best.ckpt, weights_fp16.pt and oof/ (from rank 0 alone
            when several processes train the fold).
        device: Where to train.
        resume: Continue from ``out_dir/last.ckpt``. Without it, a folder that
            already holds a checkpoint is an error, so nothing is overwritten
            by accident.
        extras: External sources whose samples join the training images only,
            drawn as often as their weights say (see :mod:`nucleiseg.data.sources`).
        pseudo_labelled: Images of another domain with pseudo-labels (unknown
            pixels :data:`nucleiseg.data.targets.UNKNOWN`, left out of the
            loss), drawn for ``pseudo_per_batch`` items of every batch (see
            :class:`nucleiseg.data.dataset.BatchShare`); never validated on.
        pseudo_per_batch: Items of each batch drawn from ``pseudo_labelled``.

    Returns:
        The model after the last epoch.
    """
    out_dir = Path(out_dir)
    last_path = out_dir / LAST
    if last_path.exists() and not resume:
        raise FileExistsError(
            f"{last_path} exists: pass --resume to continue it, or choose another --out-dir"
        )
    trainer = Trainer.create(config, device)
    start_epoch, history, best_score = 0, [], -1.0
    if resume and last_path.exists():
        start_epoch, history, best_score = trainer.restore(
            torch.load(last_path, map_location=device, weights_only=False)
        )
        log.info("resuming %s after epoch %d", out_dir, start_epoch)
    main = distributed.is_main()
    if main:
        save_config(config, out_dir / CONFIG)

    family = trainer.family
    extra_samples = [s for extra in extras for s in extra.samples]
    transform = train_transform(
        config.crop_size, config.scale_range, config.colour_augment, config.colour
    )
    per_batch = pseudo_per_batch if pseudo_labelled else 0
    dataset = NucleiDataset(
        [family.prepare(s, config) for s in [*train_samples, *extra_samples]],
        transform=transform,
        samples_per_epoch=trainer.steps_per_epoch * (config.batch_size - per_batch),
        target_fn=family.target_fn(config),
        probabilities=mix_probabilities(
            sample_weights(
                [modalities[s.image_id] for s in train_samples], config.modality_weights
            ),
            extras,
        ),
        seed=config.seed,
    )
    if per_batch:
        pseudo = NucleiDataset(
            [family.prepare(s, config) for s in pseudo_labelled],
            transform=transform,
            samples_per_epoch=trainer.steps_per_epoch * per_batch,
            target_fn=family.target_fn(config),
            # Its own stream of draws: item i must not repeat the crop of base item i.
            seed=config.seed + 1,
        )
        dataset = BatchShare(dataset, pseudo, config.batch_size, per_batch)

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        dataset.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_size=distributed.local_batch_size(config.batch_size),
            shuffle=False,
            sampler=distributed.sampler(dataset),
            drop_last=True,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            collate_fn=family.collate,
        )
        row = {
            "epoch": epoch + 1,
            "train_loss": trainer.train_one_epoch(loader, epoch),
            "val_loss": float("nan"),
            "val_map": float("nan"),
            "lr": trainer.scheduler.get_last_lr()[0],
        }
        # Rank 0 alone validates; the other ranks wait for it in trainer.state below.
        if main and epoch + 1 == config.epochs:
            # Out-of-fold predictions come from the last epoch, not the best one:
            # picking the epoch by its validation score would tune on the held-out
            # images. They are made in the last validation pass itself.
            row["val_loss"], row["val_map"] = finish_fold(
                trainer.model, config, val_samples, out_dir, device
            )
        elif main and (epoch + 1) % config.val_every == 0:
            row["val_loss"], row["val_map"] = trainer.validate(val_samples)
        row["seconds"] = time.perf_counter() - started
        row["peak_memory_mb"] = peak_memory_mb(device)
        history.append(row)
        validation = (
            "validation not run"
            if math.isnan(row["val_map"])
            else f"val loss {row['val_loss']:.4f}, val mAP {row['val_map']:.4f}"
        )
        log.info(
            "epoch %d: train loss %.4f, %s, %.0f s",
            row["epoch"],
            row["train_loss"],
            validation,
            row["seconds"],
        )
        state = trainer.state(epoch + 1, history, max(best_score, row["val_map"]))
        if main:
            if row["val_map"] > best_score:
                best_score = row["val_map"]
                _save(state, out_dir / BEST)
            _save(state, last_path)
            _write_history(history, out_dir / EPOCHS_CSV)

    return trainer.model


def train_folds(
    config: TrainConfig,
    data_dir: Path,
    folds_csv: Path,
    fold_spec: str,
    run_dir: Path,
    device: torch.device,
    resume: bool = False,
) -> list[int]:
    """Train the folds named by ``fold_spec`` on a dataset, one after the other.

    Args:
        config: The resolved configuration.
        data_dir: Dataset root holding ``stage1_train/``, or a labelled folder
            (see :func:`nucleiseg.data.reading.labelled_root`).
        folds_csv: Fold assignment covering every training image.
        fold_spec: A fold number, a comma-separated list, or ``all``.
        run_dir: Run folder; fold K goes to ``run_dir/fold<K>``, with its
            ``split.csv`` (the images it trains on and holds out).
        device: Where to train.
        resume: Continue folds from their last checkpoints.

    Returns:
        The folds trained.
    """
    # One job per run folder: a second one into it stops at once instead of mixing
    # its files in. Rank 0 alone writes, so it alone holds the lock.
    lock = folder_lock(run_dir) if distributed.is_main() else contextlib.nullcontext()
    with lock:
        root = labelled_root(data_dir)
        images = find_images(root)
        assignment = fold_assignment(folds_csv, images)
        folds = parse_fold_list(fold_spec, sorted(assignment["fold"].unique()))
        extras = [load_source(source) for source in parse_sources(config.extra_data)]
        samples = load_samples(root, list(images))
        modalities = dict(zip(assignment["image_id"], assignment["modality"], strict=True))
        fold_of = dict(zip(assignment["image_id"], assignment["fold"], strict=True))
        for fold in folds:
            train = [s for s in samples if fold_of[s.image_id] != fold]
            val = [s for s in samples if fold_of[s.image_id] == fold]
            out_dir = Path(run_dir) / f"fold{fold}"
            log.info(
                "fold %d: %d training, %d validation images, %s -> %s",
                fold,
                len(train),
                len(val),
                ", ".join(f"{len(e.samples)} tiles of {e.source.name}" for e in extras)
                or "no extras",
                out_dir,
            )
            if distributed.is_main():
                write_run_info(
                    out_dir,
                    fold=fold,
                    data_dir=data_dir,
                    device=device,
                    amp=config.amp,
                    extra_data=[e.source.path for e in extras],
                    processes=distributed.world_size(),
                )
                write_split(out_dir, [s.image_id for s in train], [s.image_id for s in val])
            train_fold(
                config.for_fold(fold),
                train,
                val,
                modalities,
                out_dir,
                device,
                resume=resume,
                extras=extras,
            )
    return folds
