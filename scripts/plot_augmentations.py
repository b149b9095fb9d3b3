"""Draw a grid of augmented training crops: one row per colour step, one column per image.

    python scripts/plot_augmentations.py --data-dir ../shared/data/dsb2018 \
        --extra ../shared/data/monuseg/train --out ablations/results/augmentations.png

Columns are the first image of each modality in ``--data-dir`` (by the folds
CSV) and the first image of each ``--extra`` folder; rows are the crop as
drawn (scaled crop and D4 only), then each colour step of
``nucleiseg.data.augment`` applied alone (probability 1), then the recipe of a
configuration (``--config``, default: the training defaults), seeded so the
figure is reproducible.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import albumentations as A
import numpy as np
from matplotlib.figure import Figure

from nucleiseg.atomic import atomic_path
from nucleiseg.competition.folds import read_folds
from nucleiseg.data import augment, reading
from nucleiseg.data.modality import MODALITIES
from nucleiseg.models.config import load_config

CROP = 256
STEPS = {
    "fluorescence as stained tissue": augment.StainFluorescence(p=1.0),
    "haematoxylin only": augment.HaematoxylinOnly(p=1.0),
    "H&E stain jitter": augment.StainJitter(p=1.0),
    "inversion": A.InvertImg(p=1.0),
    "channel shuffle": A.ChannelShuffle(p=1.0),
    "grey": A.ToGray(num_output_channels=3, p=1.0),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=reading.SAMPLE_DIR)
    parser.add_argument("--folds-csv", type=Path, default=Path("folds/folds.csv"))
    parser.add_argument("--extra", type=Path, nargs="*", default=[], help="labelled folders")
    parser.add_argument("--config", type=Path, help="configuration whose recipe is the last row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("ablations/results/augmentations.png"))
    return parser


def _columns(args: argparse.Namespace) -> list[tuple[str, np.ndarray]]:
    root = reading.labelled_root(args.data_dir)
    images = reading.find_images(root)
    folds = read_folds(args.folds_csv)
    folds = folds[folds["image_id"].isin(list(images))]
    columns = []
    for modality in MODALITIES:
        ids = folds.loc[folds["modality"] == modality, "image_id"]
        if len(ids):
            columns.append((modality, reading.read_image(images[sorted(ids)[0]])))
    for folder in args.extra:
        first = next(iter(reading.find_images(folder).values()))
        columns.append((folder.parent.name or folder.name, reading.read_image(first)))
    if not columns:
        raise reading.DataError(f"{root}: no images to draw")
    return columns


def _seeded(transform: A.BasicTransform | A.BaseCompose, seed: int) -> None:
    rng = np.random.default_rng(seed)
    transform.set_random_state(rng, random.Random(seed))


def main(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    columns = _columns(args)
    crop = A.Compose([augment.ScaledRandomCrop(CROP, (1.0, 1.0))])
    recipe = augment.train_transform(CROP, config.scale_range, True, config.colour)
    rows = ["crop", *STEPS, "recipe (x3 draws)"]
    figure = Figure(figsize=(2.0 * len(columns), 2.0 * (len(rows) + 2)))
    axes = figure.subplots(len(rows) + 2, len(columns), squeeze=False)
    for col, (name, image) in enumerate(columns):
        _seeded(crop, args.seed + col)
        base = crop(image=image)["image"]
        tiles = [base]
        for step in STEPS.values():
            _seeded(step, args.seed + col)
            tiles.append(step(image=base)["image"])
        for draw in range(3):
            _seeded(recipe, args.seed + 100 * draw + col)
            tiles.append(recipe(image=image, mask=np.zeros(image.shape[:2], np.int32))["image"])
        for row, tile in enumerate(tiles):
            axis = axes[row, col]
            axis.imshow(tile)
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(rows[min(row, len(rows) - 1)], fontsize=8)
        axes[0, col].set_title(name, fontsize=9)
    figure.tight_layout()
    with atomic_path(args.out) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
