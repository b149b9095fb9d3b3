import numpy as np
import pandas as pd
import pytest
from helpers import run_script, write_labelled
from skimage.draw import disk

from nucleiseg import cli
from nucleiseg.competition import metric
from nucleiseg.competition.submission import write_submission


@pytest.fixture
def truth(tmp_path):
    labels_by_image = {}
    for i, shape in enumerate([(40, 50), (32, 32)]):
        labels = np.zeros(shape, np.int32)
        for label, (center, radius) in enumerate([((10, 10), 5), ((22, 20 + i), 6)], start=1):
            rr, cc = disk(center, radius, shape=shape)
            labels[rr, cc] = label
        labels_by_image[f"image{i}"] = labels
    write_labelled(tmp_path / "truth", labels_by_image)
    return labels_by_image


def test_validate_submission_script(tmp_path, truth, capsys):
    good = write_submission(truth, tmp_path / "good.csv")
    assert run_script("validate_submission", [good, "--images", tmp_path / "truth"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK: 4 rows, 2 images"

    bad = tmp_path / "bad.csv"
    lines = good.read_text().splitlines()
    bad.write_text("\n".join([*lines[:2], "image0,5 2 1 1", *lines[3:], "stray,1 1"]) + "\n")
    with pytest.raises(cli.Refused) as refused:
        run_script("validate_submission", [bad, "--images", tmp_path / "truth"])
    assert refused.value.code == cli.USAGE_STATUS
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: image0 row 3: starts not ascending")
    assert err[1] == "error: stray row 6: unknown ImageId"


def test_score_submission_script(tmp_path, truth, capsys):
    shifted = {image_id: np.roll(labels, 3, axis=0) for image_id, labels in truth.items()}
    path = write_submission(shifted, tmp_path / "sub.csv")
    per_image = tmp_path / "scores" / "per_image.csv"
    argv = [path, "--truth", tmp_path / "truth", "--per-image", per_image]
    assert run_script("score_submission", argv) == 0
    expected = metric.mean_average_precision(
        metric.average_precision(truth[i], shifted[i]) for i in truth
    )
    assert capsys.readouterr().out.splitlines()[-1] == f"score: {expected:.6f}"
    scores = pd.read_csv(per_image)
    assert list(scores["image_id"]) == ["image0", "image1"]
    assert scores["score"].mean() == pytest.approx(expected)

    perfect = write_submission(truth, tmp_path / "perfect.csv")
    assert run_script("score_submission", [perfect, "--truth", tmp_path / "truth"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "score: 1.000000"


def test_score_submission_script_rejects_invalid(tmp_path, truth, capsys):
    partial = write_submission({"image0": truth["image0"]}, tmp_path / "partial.csv")
    with pytest.raises(cli.Refused) as refused:
        run_script("score_submission", [partial, "--truth", tmp_path / "truth"])
    assert refused.value.code == cli.USAGE_STATUS
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["error: image1: image missing from the submission"]
    assert "score:" not in captured.out
