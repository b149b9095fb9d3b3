"""Tests for same-scene grouping and leak-free folds, on synthetic scenes of discs."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import run_script, write_item
from skimage.draw import disk

from nucleiseg.competition.folds import (
    ADJACENT,
    DUPLICATE,
    FOLD_COLUMNS,
    OVERLAP,
    assign_folds,
    connected_groups,
    find_groups,
    find_scene_pairs,
    fold_assignment,
    parse_fold_list,
    read_folds,
    write_folds,
)
from nucleiseg.data.modality import MODALITIES
from nucleiseg.data.reading import DataError


def _scene(shape: tuple[int, int], n_discs: int, seed: int) -> np.ndarray:
    """Grey uint8 field of bright textured discs on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    field = np.full(shape, 12.0)
    for _ in range(n_discs):
        centre = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        rr, cc = disk(centre, rng.uniform(5, 10), shape=shape)
        field[rr, cc] = rng.uniform(70, 200)
    field = cv2.GaussianBlur(field, (0, 0), 1.0) + rng.normal(0, 2, shape)
    return np.clip(field, 0, 255).astype(np.uint8)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def scenes() -> dict[str, np.ndarray]:
    big = _scene((512, 768), 450, seed=1)
    other = _scene((256, 256), 70, seed=2)
    rescaled = cv2.resize(other, (384, 384), interpolation=cv2.INTER_LINEAR)
    dimmer = np.clip(rescaled * 0.6 + 20, 0, 255).astype(np.uint8)
    images = {
        "tile_00": big[:256, :256],  # tile_01 to its right, tile_10 below it
        "tile_01": big[:256, 256:512],
        "tile_10": big[256:, :256],
        "overlap": big[100:356, 400:656],  # shares 156 x 112 pixels with tile_01
        "dup_a": other,
        "dup_b": dimmer,  # the same field at 1.5 times the size, other contrast
        "flat": np.clip(np.random.default_rng(3).normal(12, 2, (256, 256)), 0, 255).astype(
            np.uint8
        ),
    }
    for seed in range(4, 8):
        images[f"unrelated_{seed}"] = _scene((256, 256), 70, seed=seed)
    return {k: _rgb(np.ascontiguousarray(v)) for k, v in images.items()}


def test_find_scene_pairs_finds_each_kind(scenes):
    pairs = {(p.first, p.second): p.kind for p in find_scene_pairs(scenes)}
    assert pairs == {
        ("tile_00", "tile_01"): ADJACENT,
        ("tile_00", "tile_10"): ADJACENT,
        ("overlap", "tile_01"): OVERLAP,
        ("dup_a", "dup_b"): DUPLICATE,
    }


def test_find_groups_joins_exactly_the_same_scene(scenes):
    groups = find_groups(scenes)
    members: dict[int, set[str]] = {}
    for image_id, group in groups.items():
        members.setdefault(group, set()).add(image_id)
    expected = [{"tile_00", "tile_01", "tile_10", "overlap"}, {"dup_a", "dup_b"}]
    expected += [{k} for k in scenes if not k.startswith(("tile", "overlap", "dup"))]
    assert sorted(map(sorted, members.values())) == sorted(map(sorted, expected))
    # Numbered in the order of each group's smallest id.
    firsts = sorted(min(m) for m in members.values())
    assert [groups[k] for k in firsts] == list(range(len(firsts)))


def test_flat_images_are_not_grouped():
    flat = [np.random.default_rng(s).normal(10, 3, (128, 128)) for s in (0, 1)]
    images = {f"flat_{i}": _rgb(np.clip(f, 0, 255).astype(np.uint8)) for i, f in enumerate(flat)}
    images["textured"] = _rgb(_scene((128, 128), 30, seed=9))
    assert sorted(find_groups(images).values()) == [0, 1, 2]


def test_connected_groups_numbers_by_smallest_id():
    groups = connected_groups(["d", "c", "b", "a", "e"], [("e", "b"), ("d", "c")])
    assert groups == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 1}


def _fold_inputs(n_groups: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids, modalities, groups = [], {}, {}
    for g in range(n_groups):
        modality = MODALITIES[g % 3]
        for j in range(int(rng.integers(1, 5))):
            image_id = f"img{g:03d}_{j}"
            ids.append(image_id)
            modalities[image_id], groups[image_id] = modality, g
    return ids, modalities, groups


def test_assign_folds_keeps_groups_whole_and_stratifies():
    ids, modalities, groups = _fold_inputs()
    frame = assign_folds(ids, modalities, groups, n_folds=5, seed=0)
    assert list(frame.columns) == list(FOLD_COLUMNS)
    assert sorted(frame["image_id"]) == sorted(ids) == list(frame["image_id"])
    assert (frame.groupby("group")["fold"].nunique() == 1).all()
    assert set(frame["fold"]) == set(range(5))
    # 13 or 14 groups of each modality: every fold gets some of each.
    assert (pd.crosstab(frame["fold"], frame["modality"]) > 0).all().all()


def test_assign_folds_is_deterministic_from_seed():
    ids, modalities, groups = _fold_inputs()
    first = assign_folds(ids, modalities, groups, seed=3)
    pd.testing.assert_frame_equal(first, assign_folds(ids[::-1], modalities, groups, seed=3))
    assert not first["fold"].equals(assign_folds(ids, modalities, groups, seed=4)["fold"])


def test_assign_folds_warns_about_a_rare_modality_and_refuses_too_few_groups(caplog):
    ids, modalities, groups = _fold_inputs(n_groups=10)
    with caplog.at_level(logging.WARNING, logger="nucleiseg.competition.folds"):
        frame = assign_folds(ids, modalities, groups, n_folds=5)
    assert "brightfield: 3 group(s) for 5 folds" in caplog.text
    assert (frame.groupby("group")["fold"].nunique() == 1).all()
    with pytest.raises(ValueError, match="cannot fill"):
        assign_folds(ids, modalities, groups, n_folds=11)


def test_write_then_read_folds_round_trips(tmp_path):
    ids, modalities, groups = _fold_inputs()
    frame = assign_folds(ids, modalities, groups)
    write_folds(frame, tmp_path / "a.csv")
    write_folds(assign_folds(ids, modalities, groups), tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    pd.testing.assert_frame_equal(read_folds(tmp_path / "a.csv"), frame)


def test_read_folds_rejects_a_group_split_over_folds(tmp_path):
    ids, modalities, groups = _fold_inputs()
    frame = assign_folds(ids, modalities, groups)
    split_group = frame["group"].value_counts().idxmax()
    row = frame.index[frame["group"] == split_group][0]
    frame.loc[row, "fold"] = (frame.loc[row, "fold"] + 1) % 5
    frame.to_csv(tmp_path / "folds.csv", index=False)
    with pytest.raises(DataError, match="span more than one fold"):
        read_folds(tmp_path / "folds.csv")


def test_read_folds_rejects_missing_columns_and_bad_folds(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("image_id,fold,group\na,0,0\n")
    with pytest.raises(DataError, match="missing column"):
        read_folds(path)
    path.write_text("image_id,fold,modality,group\na,0,tissue,0\nb,2,tissue,1\n")
    with pytest.raises(DataError, match="none empty"):
        read_folds(path)


def test_fold_assignment_takes_a_subset_and_rejects_unknown_images(tmp_path):
    ids, modalities, groups = _fold_inputs()
    frame = assign_folds(ids, modalities, groups)
    write_folds(frame, tmp_path / "folds.csv")
    subset = fold_assignment(tmp_path / "folds.csv", ids[10:0:-3])
    pd.testing.assert_frame_equal(
        subset, frame[frame["image_id"].isin(ids[10:0:-3])].reset_index(drop=True)
    )
    with pytest.raises(DataError, match="no fold for 1 image"):
        fold_assignment(tmp_path / "folds.csv", [ids[0], "not_in_the_file"])


def test_parse_fold_list():
    assert parse_fold_list("all", [3, 0, 1, 2, 4]) == [0, 1, 2, 3, 4]
    assert parse_fold_list("2", range(5)) == [2]
    assert parse_fold_list("3, 1,3", range(5)) == [1, 3]
    with pytest.raises(ValueError, match="not among"):
        parse_fold_list("5", range(5))
    with pytest.raises(ValueError, match="cannot read"):
        parse_fold_list("0-2", range(5))


def test_script_writes_folds_and_refuses_to_overwrite(tmp_path):
    for seed in range(6):
        write_item(tmp_path / "data" / "stage1_train", f"image{seed}", _scene((64, 64), 8, seed))
    out = tmp_path / "folds" / "folds.csv"
    argv = ["--data-dir", tmp_path / "data", "--out", out, "--folds", "3"]
    run_script("make_folds", argv)
    written = out.read_bytes()
    assert len(read_folds(out)) == 6
    with pytest.raises(SystemExit, match="--force"):
        run_script("make_folds", argv)
    run_script("make_folds", [*argv, "--force"])
    assert out.read_bytes() == written


def test_committed_folds_cover_the_training_set():
    frame = read_folds(Path(__file__).resolve().parents[1] / "folds" / "folds.csv")
    assert len(frame) == 664
    assert sorted(frame["fold"].unique()) == [0, 1, 2, 3, 4]
    assert frame["modality"].value_counts().to_dict() == {
        "fluorescence": 541,
        "tissue": 107,
        "brightfield": 16,
    }
