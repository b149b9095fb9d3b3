"""Re-score every CV number the README quotes from the saved out-of-fold label images.

    python scripts/reproduce_cv.py
    python scripts/reproduce_cv.py --reported ablations/reported.yaml --data-dir DIR

``--reported`` lists each quoted number: its name, the run folder whose
``fold<K>/oof/labels/`` hold the label images it comes from, the value quoted
and the command that made the folder. No model runs: the labels are scored
against the true masks with the competition metric. Prints one row per entry
(CV overall and per modality, the quoted value), writes them to ``--out``
(the table ``scripts/plot_results.py`` draws), and exits with an error naming
every entry whose CV is not the quoted one to 4 decimals, or whose label
images are missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from nucleiseg.atomic import atomic_path
from nucleiseg.competition.folds import DEFAULT_FOLDS_PATH
from nucleiseg.evaluation.summary import cv_summary, evaluate_run

_ENTRY_KEYS = {"name", "oof", "cv", "made_by"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reported", type=Path, default=Path("ablations/reported.yaml"))
    parser.add_argument("--data-dir", type=Path, help="dataset (default: the file's data_dir)")
    parser.add_argument("--folds-csv", type=Path, default=DEFAULT_FOLDS_PATH)
    parser.add_argument("--out", type=Path, default=Path("ablations/results/reported.csv"))
    return parser


def read_reported(path: Path) -> tuple[Path | None, list[dict]]:
    """The data folder and the entries of a reported-numbers file.

    Raises:
        ValueError: For an entry without a name, an OOF folder or a quoted CV,
            or with an unknown key.
    """
    content = yaml.safe_load(Path(path).read_text()) or {}
    entries = content.get("entries") or []
    for i, entry in enumerate(entries):
        missing = {"name", "oof", "cv"} - set(entry)
        unknown = set(entry) - _ENTRY_KEYS
        if missing or unknown:
            raise ValueError(
                f"{path}: entry {i + 1} lacks {sorted(missing)} or has unknown {sorted(unknown)}"
            )
    data_dir = content.get("data_dir")
    return (Path(data_dir) if data_dir else None), entries


def main(args: argparse.Namespace) -> pd.DataFrame:
    data_dir, entries = read_reported(args.reported)
    data_dir = args.data_dir or data_dir
    rows, problems = [], []
    for entry in entries:
        try:
            per_image = evaluate_run(Path(entry["oof"]), data_dir, args.folds_csv)
        except (FileNotFoundError, ValueError) as error:
            problems.append(f"{entry['name']}: {error}")
            continue
        row = {"name": entry["name"], **cv_summary(per_image), "quoted": entry["cv"]}
        rows.append(row | {"oof": entry["oof"], "made_by": entry.get("made_by", "")})
        if round(row["cv"], 4) != round(float(entry["cv"]), 4):
            problems.append(f"{entry['name']}: CV {row['cv']:.4f}, the README quotes {entry['cv']}")
    table = pd.DataFrame(rows)
    if len(table):
        shown = table.drop(columns=["oof", "made_by"]).set_index("name")
        print(shown.to_string(float_format="%.4f"))
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
    if problems:
        raise SystemExit("not reproduced:\n  " + "\n  ".join(problems))
    print(f"all {len(table)} quoted CV numbers reproduced -> {args.out}")
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
