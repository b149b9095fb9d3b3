"""Draw the ablation leaderboards and the CV per modality as PNG figures.

    python scripts/plot_results.py
    python scripts/plot_results.py --results ablations/results --out-dir ablations/results

Reads the leaderboards ``scripts/ablate.py`` wrote (``<results>/*.csv`` with a
``variant`` column) and the re-scored README numbers of
``scripts/reproduce_cv.py`` (``<results>/reported.csv``), and writes
``leaderboard.png`` (one panel per ablation: each variant's CV, best first,
with the baseline marked), ``cv_by_modality.png`` (CV overall and per
modality of each reported result scored on all images; single-fold ones are
left out) and, for each leaderboard that also scored external data (such as
MoNuSeg test, held out), ``<name>.png`` with the CV, its modalities and each
external score side by side. Nothing is recomputed.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nucleiseg.atomic import atomic_path
from nucleiseg.data.modality import MODALITIES
from nucleiseg.evaluation.ablation import FIXED_COLUMNS

REPORTED = "reported.csv"
LEADERBOARD_PNG = "leaderboard.png"
MODALITY_PNG = "cv_by_modality.png"
LABEL_WIDTH = 36  # characters per line of a variant name


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("ablations/results"))
    parser.add_argument("--out-dir", type=Path, help="where the PNGs go (default: --results)")
    return parser


def read_leaderboards(results: Path) -> dict[str, pd.DataFrame]:
    """Each ablation's leaderboard (CSV with ``variant`` and ``cv``), by ablation name."""
    boards = {}
    for path in sorted(results.glob("*.csv")):
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
        if {"variant", "cv", "delta"} <= set(table.columns):
            boards[path.stem] = table[table["cv"].notna()]  # not those waiting for runs
    return boards


def _colour(delta: float) -> str:
    """Grey for the baseline and for deltas that round to zero at the 4 digits shown."""
    delta = round(float(delta), 4)
    return "0.6" if delta == 0 else ("tab:green" if delta > 0 else "tab:red")


def plot_leaderboards(boards: dict[str, pd.DataFrame], path: Path) -> None:
    """One horizontal bar panel per ablation, best variant on top, baseline in grey."""
    labels = {
        name: [textwrap.fill(str(v), LABEL_WIDTH) for v in board["variant"]]
        for name, board in boards.items()
    }
    heights = [
        0.9 + 0.3 * max(sum(label.count("\n") + 1 for label in labels[name]), 2) for name in boards
    ]
    figure = Figure(figsize=(9, sum(heights)), layout="tight")
    axes = figure.subplots(len(boards), 1, height_ratios=heights, squeeze=False)
    for axis, (name, board) in zip(axes[:, 0], boards.items(), strict=True):
        ranked = board.assign(label=labels[name]).sort_values("cv")
        colours = [_colour(delta) for delta in ranked["delta"]]
        axis.barh(ranked["label"], ranked["cv"], color=colours)
        for y, (cv, delta) in enumerate(zip(ranked["cv"], ranked["delta"], strict=True)):
            axis.text(cv, y, f" {cv:.4f} ({delta:+.4f})", va="center", fontsize=8)
        low, high = ranked["cv"].min(), ranked["cv"].max()
        margin = max(high - low, 0.01)
        axis.set_xlim(max(0.0, low - margin), high + 0.9 * margin)
        axis.set_title(f"{name}: out-of-fold CV (grey = baseline)", fontsize=10, loc="left")
        axis.tick_params(labelsize=8)
    _save(figure, path)


def external_columns(board: pd.DataFrame) -> list[str]:
    """The columns of a leaderboard that score external data sets."""
    return [c for c in board.columns if c not in FIXED_COLUMNS]


def plot_external(board: pd.DataFrame, name: str, path: Path) -> None:
    """One panel per score (CV, each modality, each external set), variants in CV order."""
    panels = ["cv", *MODALITIES, *external_columns(board)]
    panels = [p for p in panels if board[p].notna().any()]
    ranked = board.sort_values("cv")
    labels = [textwrap.fill(str(v), LABEL_WIDTH) for v in ranked["variant"]]
    height = max(2.5, 0.9 + 0.32 * sum(label.count("\n") + 1 for label in labels))
    figure = Figure(figsize=(3.0 + 2.4 * len(panels), height), layout="tight")
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    baseline = board.loc[board["delta"] == 0, "variant"]
    for axis, panel in zip(axes, panels, strict=True):
        values = ranked[panel].to_numpy(dtype=float)
        colours = ["0.6" if v in set(baseline) else "tab:blue" for v in ranked["variant"]]
        axis.barh(labels, np.nan_to_num(values), color=colours)
        for y, value in enumerate(values):
            if np.isfinite(value):
                axis.text(value, y, f" {value:.3f}", va="center", fontsize=7)
        axis.set_xlim(0, min(1.0, 1.3 * np.nanmax(values)) if np.isfinite(values).any() else 1)
        axis.set_title("DSB OOF CV" if panel == "cv" else panel, fontsize=9)
        axis.tick_params(labelsize=7)
    title = f"{name}: mean AP per data set (grey = baseline)"
    figure.suptitle(title, fontsize=10, x=0.01, ha="left")
    _save(figure, path)


def full_cv(reported: pd.DataFrame) -> pd.DataFrame:
    """The reported results scored on the most images (all folds), not single-fold ablations."""
    return reported[reported["images"] == reported["images"].max()]


def plot_modalities(reported: pd.DataFrame, path: Path) -> None:
    """Grouped bars: each reported result's CV overall and per modality."""
    groups = ["cv", *MODALITIES]
    x = np.arange(len(groups))
    width = 0.8 / max(len(reported), 1)
    figure = Figure(
        figsize=(max(6.0, 0.9 * len(groups) * max(len(reported), 2)), 4), layout="tight"
    )
    axis = figure.subplots()
    for i, (_, row) in enumerate(reported.iterrows()):
        values = [row[g] for g in groups]
        bars = axis.bar(x + (i - (len(reported) - 1) / 2) * width, values, width, label=row["name"])
        axis.bar_label(bars, fmt="%.3f", fontsize=7)
    axis.set_xticks(x, ["all images", *MODALITIES])
    axis.set_ylabel("mean AP, out of fold")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8, loc="upper right")
    images = int(reported["images"].max())
    axis.set_title(f"CV per modality, out of fold on {images} images", fontsize=10, loc="left")
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110)


def main(args: argparse.Namespace) -> list[Path]:
    out_dir = args.out_dir or args.results
    written = []
    boards = read_leaderboards(args.results)
    if boards:
        plot_leaderboards(boards, out_dir / LEADERBOARD_PNG)
        written.append(out_dir / LEADERBOARD_PNG)
    for name, board in boards.items():
        if external_columns(board):
            plot_external(board, name, out_dir / f"{name}.png")
            written.append(out_dir / f"{name}.png")
    if (args.results / REPORTED).is_file():
        plot_modalities(full_cv(pd.read_csv(args.results / REPORTED)), out_dir / MODALITY_PNG)
        written.append(out_dir / MODALITY_PNG)
    if not written:
        raise SystemExit(f"{args.results}: no leaderboard CSV and no {REPORTED} to draw")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main(get_args_parser().parse_args())
