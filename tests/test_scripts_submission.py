import importlib.util

import cv2
import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

from nucleiseg import metric
from nucleiseg.submission import write_submission


def write_competition_folder(root, labels_by_image):
    """``<root>/<id>/images/<id>.png`` plus one 0/255 PNG per object in ``<id>/masks``."""
    for image_id, labels in labels_by_image.items():
        (root / image_id / "images").mkdir(parents=True)
        (root / image_id / "masks").mkdir()
        image = np.where(labels > 0, 200, 20).astype(np.uint8)
        cv2.imwrite(str(root / image_id / "images" / f"{image_id}.png"), np.dstack([image] * 3))
        for label in np.unique(labels[labels > 0]):
            mask = np.where(labels == label, 255, 0).astype(np.uint8)
            cv2.imwrite(str(root / image_id / "masks" / f"{image_id}_{label}.png"), mask)


@pytest.fixture
def truth(tmp_path):
    labels_by_image = {}
    for i, shape in enumerate([(40, 50), (32, 32)]):
        labels = np.zeros(shape, np.int32)
        for label, (center, radius) in enumerate([((10, 10), 5), ((22, 20 + i), 6)], start=1):
            rr, cc = disk(center, radius, shape=shape)
            labels[rr, cc] = label
        labels_by_image[f"image{i}"] = labels
    write_competition_folder(tmp_path / "truth", labels_by_image)
    return labels_by_image


@pytest.fixture
def run(repo_root):
    """Call a script's ``main`` on command-line arguments, returning its exit status."""

    def run_script(name, argv):
        spec = importlib.util.spec_from_file_location(name, repo_root / "scripts" / f"{name}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        return script.main(script.get_args_parser().parse_args([str(a) for a in argv]))

    return run_script


def test_validate_submission_script(tmp_path, truth, run, capsys):
    good = write_submission(truth, tmp_path / "good.csv")
    assert run("validate_submission", [good, "--images", tmp_path / "truth"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK: 4 rows, 2 images"

    bad = tmp_path / "bad.csv"
    lines = good.read_text().splitlines()
    bad.write_text("\n".join([*lines[:2], "image0,5 2 1 1", *lines[3:], "stray,1 1"]) + "\n")
    assert run("validate_submission", [bad, "--images", tmp_path / "truth"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("image0 row 3: starts not ascending")
    assert out[1] == "stray row 6: unknown ImageId"


def test_score_submission_script(tmp_path, truth, run, capsys):
    shifted = {image_id: np.roll(labels, 3, axis=0) for image_id, labels in truth.items()}
    path = write_submission(shifted, tmp_path / "sub.csv")
    per_image = tmp_path / "scores" / "per_image.csv"
    argv = [path, "--truth", tmp_path / "truth", "--per-image", per_image]
    assert run("score_submission", argv) == 0
    expected = metric.mean_average_precision(
        metric.average_precision(truth[i], shifted[i]) for i in truth
    )
    assert capsys.readouterr().out.splitlines()[-1] == f"score: {expected:.6f}"
    scores = pd.read_csv(per_image)
    assert list(scores["image_id"]) == ["image0", "image1"]
    assert scores["score"].mean() == pytest.approx(expected)

    perfect = write_submission(truth, tmp_path / "perfect.csv")
    assert run("score_submission", [perfect, "--truth", tmp_path / "truth"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "score: 1.000000"


def test_score_submission_script_rejects_invalid(tmp_path, truth, run, capsys):
    partial = write_submission({"image0": truth["image0"]}, tmp_path / "partial.csv")
    assert run("score_submission", [partial, "--truth", tmp_path / "truth"]) == 1
    assert capsys.readouterr().out.splitlines() == ["image1: image missing from the submission"]
