import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

from nucleiseg.competition import metric, submission
from nucleiseg.competition.submission import Problem, SubmissionError


def disc_labels(shape, discs):
    labels = np.zeros(shape, np.int32)
    for label, (center, radius) in discs.items():
        rr, cc = disk(center, radius, shape=shape)
        labels[rr, cc] = label
    return labels


@pytest.fixture
def labels_by_image():
    return {
        "img_b": disc_labels((24, 30), {1: ((6, 6), 4), 2: ((15, 20), 5), 3: ((23, 0), 3)}),
        "img_empty": np.zeros((16, 16), np.int32),
        "img_a": disc_labels((20, 20), {7: ((5, 14), 3), 40: ((13, 6), 4)}).astype(np.uint16),
    }


def sizes_of(labels_by_image):
    return {image_id: labels.shape for image_id, labels in labels_by_image.items()}


def consecutive(labels):
    """Relabel to 1, 2, ... in ascending order of the original labels."""
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)


def test_write_read_round_trip(tmp_path, labels_by_image):
    path = submission.write_submission(labels_by_image, tmp_path / "sub" / "submission.csv")
    assert path == tmp_path / "sub" / "submission.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == "ImageId,EncodedPixels"
    # Rows sorted by image id; the image without nuclei has one empty row.
    assert [line.split(",")[0] for line in lines[1:]] == ["img_a"] * 2 + ["img_b"] * 3 + [
        "img_empty"
    ]
    assert lines[-1] == "img_empty,"
    read = submission.read_submission(path, sizes_of(labels_by_image))
    assert list(read) == list(labels_by_image)
    for image_id, labels in labels_by_image.items():
        assert read[image_id].dtype == np.int32
        np.testing.assert_array_equal(read[image_id], consecutive(labels))
    assert submission.validate_submission(path, sizes_of(labels_by_image)) == []


def test_failed_write_leaves_nothing_behind(tmp_path, labels_by_image, monkeypatch):
    path = tmp_path / "submission.csv"
    submission.write_submission(labels_by_image, path)
    before = path.read_bytes()

    def broken_encoder(labels):
        return [(1, "5 2 1 2")]  # runs out of order, as a buggy encoder might write

    monkeypatch.setattr(submission.rle, "encode_labels", broken_encoder)
    with pytest.raises(SubmissionError, match="starts not ascending") as raised:
        submission.write_submission(labels_by_image, path)
    assert {p.image_id for p in raised.value.problems} == set(labels_by_image)
    assert path.read_bytes() == before
    with pytest.raises(SubmissionError):
        submission.write_submission(labels_by_image, tmp_path / "new.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


SIZES = {"a": (4, 4), "b": (3, 5), "c": (2, 2)}
VALID = ["ImageId,EncodedPixels", "a,1 2 5 1", "a,9 3", "b,", "c,1 4"]


def validate_lines(tmp_path, lines):
    path = tmp_path / "sub.csv"
    path.write_text("".join(line + "\n" for line in lines))
    return submission.validate_submission(path, SIZES)


def test_valid_submission_has_no_problems(tmp_path):
    assert validate_lines(tmp_path, VALID) == []
    # Blank lines are ignored without shifting the row numbers after them.
    problems = validate_lines(tmp_path, [*VALID[:2], "", *VALID[2:], "z,1 1"])
    assert [(p.image_id, p.row) for p in problems] == [("z", 7)]


@pytest.mark.parametrize(
    ("lines", "image_id", "row", "message"),
    [
        (VALID[:-1], "c", None, "image missing from the submission"),
        ([*VALID, "zz,1 1"], "zz", 6, "unknown ImageId"),
        (["ImageID,EncodedPixels", *VALID[1:]], None, 1, "header must be ImageId,EncodedPixels"),
        ([], None, 1, "got an empty file"),
        ([VALID[0], "a,1 2 5", *VALID[2:]], "a", 2, "odd number of tokens"),
        ([VALID[0], "a,1 two", *VALID[2:]], "a", 2, "non-integer token 'two'"),
        ([*VALID[:2], "a,15 3", *VALID[3:]], "a", 3, "past the last pixel of a 4x4 image"),
        ([*VALID[:2], "a,9 3 1 2", *VALID[3:]], "a", 3, "starts not ascending"),
        ([*VALID[:3], "a,", *VALID[3:]], "a", 4, "empty mask"),
        (
            [*VALID[:3], "a,2 4", *VALID[3:]],
            "a",
            4,
            "2 pixel(s) already claimed by the mask in row(s) 2",
        ),
        ([*VALID, "b,1 1"], "b", 4, "empty mask"),
        ([*VALID, "c,1 1,extra"], "c", 6, "expected 2 fields, got 3"),
    ],
)
def test_validator_reports_each_problem(tmp_path, lines, image_id, row, message):
    problems = validate_lines(tmp_path, lines)
    assert len(problems) == 1, problems
    assert problems[0].image_id == image_id
    assert problems[0].row == row
    assert message in problems[0].message


def test_malformed_row_does_not_hide_other_problems(tmp_path):
    lines = [VALID[0], "a,1 1,extra", *VALID[2:4], "zz,1 1"]
    problems = validate_lines(tmp_path, lines)
    assert [(p.image_id, p.row) for p in problems] == [("a", 2), ("zz", 5), ("c", None)]


def test_validator_lists_every_row_of_an_overlap(tmp_path):
    lines = [VALID[0], "a,1 4", "a,3 4", "a,4 1", *VALID[3:]]
    problems = validate_lines(tmp_path, lines)
    assert [(p.row, p.message) for p in problems] == [
        (3, "2 pixel(s) already claimed by the mask in row(s) 2"),
        (4, "1 pixel(s) already claimed by the mask in row(s) 2"),
    ]


def test_validator_accepts_a_frame_with_csv_row_numbers():
    frame = pd.DataFrame(
        [line.split(",") for line in [*VALID[1:], "a,9 3 1 2"]], columns=VALID[0].split(",")
    )
    assert submission.validate_submission(frame, SIZES) == [
        Problem("a", 6, "starts not ascending: run 2 starts at 1, run 1 at 9")
    ]
    frame.loc[1, "EncodedPixels"] = np.nan
    assert "must be strings" in submission.validate_submission(frame, SIZES)[0].message


def test_read_submission_raises_with_problems(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("\n".join(VALID[:-1]) + "\n")
    with pytest.raises(SubmissionError, match="c: image missing") as raised:
        submission.read_submission(path, SIZES)
    assert raised.value.problems == [Problem("c", None, "image missing from the submission")]


def test_submission_error_message_is_bounded():
    error = SubmissionError(Problem(f"img{i}", i + 2, "bad") for i in range(25))
    text = str(error)
    assert text.startswith("25 problem(s)")
    assert "img0 row 2: bad" in text
    assert "img19 row 21: bad" in text
    assert "img20" not in text
    assert text.endswith("... and 5 more")
    assert str(Problem(None, 1, "header")) == "row 1: header"
    assert str(Problem("x", None, "missing")) == "x: missing"


def test_score_against_own_truth_is_one(labels_by_image):
    result = submission.score_submission(labels_by_image, labels_by_image)
    assert result.score == 1.0
    assert list(result.per_image["image_id"]) == list(labels_by_image)
    assert list(result.per_image["tp"]) == [3, 0, 2]
    assert (result.per_image[["fp", "fn"]] == 0).all().all()


def test_score_of_shifted_submission_matches_metric(labels_by_image):
    shifted = {i: np.roll(labels, 2, axis=1) for i, labels in labels_by_image.items()}
    result = submission.score_submission(shifted, labels_by_image)
    expected = [metric.average_precision(labels_by_image[i], shifted[i]) for i in shifted]
    assert result.score == pytest.approx(metric.mean_average_precision(expected))
    assert 0 < result.score < 1
    np.testing.assert_allclose(result.per_image["score"], [s.score for s in expected])
    assert list(result.per_image["n_pred"]) == [s.n_pred for s in expected]


def test_score_needs_every_truth_image(labels_by_image):
    partial = dict(labels_by_image)
    del partial["img_a"]
    with pytest.raises(SubmissionError, match="img_a: image missing"):
        submission.score_submission(partial, labels_by_image)
    wrong_shape = {**labels_by_image, "img_a": np.zeros((5, 5), np.int32)}
    with pytest.raises(SubmissionError, match="shape differs"):
        submission.score_submission(wrong_shape, labels_by_image)
