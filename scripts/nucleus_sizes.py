"""Nucleus sizes of labelled folders: median equivalent diameter per image, modality, folder.

    python scripts/nucleus_sizes.py ../shared/data/dsb2018/stage1_train
    python scripts/nucleus_sizes.py ../shared/data/monuseg/train ../shared/data/monuseg/test

Each image's size is the median equivalent diameter of its nuclei (the
diameter of the disc of equal area); a folder's is the median of its images'.
The training set's value is the ``size_target`` of size-adaptive inference
(``nucleiseg.data.sizing.TRAIN_MEDIAN_DIAMETER``); comparing a folder of one's own
with it says whether size-adaptive inference (``predict.py --size-adaptive``)
has something to correct.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from nucleiseg.data import reading
from nucleiseg.data.modality import classify_modality
from nucleiseg.data.sizing import median_diameter


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="labelled folders")
    return parser


def main(args: argparse.Namespace) -> pd.DataFrame:
    rows = []
    for folder in args.folders:
        images = reading.find_images(folder)
        reading.check_labelled(images)
        for image_id, path in tqdm(images.items(), desc=str(folder), unit="image"):
            sample = reading.load_sample(image_id, path)
            rows.append(
                {
                    "folder": str(folder),
                    "image_id": image_id,
                    "modality": classify_modality(sample.image),
                    "diameter": median_diameter(sample.labels),
                }
            )
    sizes = pd.DataFrame(rows)
    table = sizes.groupby(["folder", "modality"])["diameter"].agg(["size", "median"])
    overall = sizes.groupby("folder")["diameter"].agg(["size", "median"])
    overall.index = pd.MultiIndex.from_arrays([overall.index, ["all"] * len(overall)])
    print(pd.concat([table, overall]).sort_index().to_string(float_format="%.2f"))
    return sizes


if __name__ == "__main__":
    main(get_args_parser().parse_args())
