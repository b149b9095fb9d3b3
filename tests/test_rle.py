import numpy as np
import pytest
from skimage.draw import disk, ellipse

from benchmarks.references import per_object_encode
from nucleiseg.competition import rle


def random_labels(rng, shape, n):
    labels = np.zeros(shape, np.int32)
    for label in rng.choice(np.arange(1, 10 * n), size=n, replace=False):
        rr, cc = ellipse(
            rng.uniform(0, shape[0]),
            rng.uniform(0, shape[1]),
            rng.uniform(1, 12),
            rng.uniform(1, 12),
            shape=shape,
            rotation=rng.uniform(0, np.pi),
        )
        labels[rr, cc] = label
    return labels


@pytest.mark.parametrize("seed", range(5))
def test_encode_labels_matches_reference(seed):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, (int(rng.integers(20, 90)), int(rng.integers(20, 90))), 15)
    assert rle.encode_labels(labels) == per_object_encode(labels)


@pytest.mark.parametrize("seed", range(3))
def test_random_noise_labels_match_reference(seed):
    # Labels changing at almost every pixel: many runs, many wraps, array growth.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=(70, 50)).astype(np.uint16)
    assert rle.encode_labels(labels) == per_object_encode(labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64, np.uint32, np.uint64])
def test_encode_labels_any_integer_dtype(dtype):
    labels = np.zeros((5, 4), dtype)
    labels[1:3, 1] = 7
    labels[4, 3] = 200
    assert rle.encode_labels(labels) == [(7, "7 2"), (200, "20 1")]


def test_encode_labels_empty_and_background_only():
    assert rle.encode_labels(np.zeros((0, 0), np.int32)) == []
    assert rle.encode_labels(np.zeros((4, 3), np.int32)) == []
    assert rle.encode(np.zeros((4, 3), bool)) == ""


def test_encode_labels_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        rle.encode_labels(np.array([[0, -1]]))
    with pytest.raises(ValueError, match="integer dtype"):
        rle.encode_labels(np.zeros((2, 2), float))
    with pytest.raises(ValueError, match="2-D"):
        rle.encode_labels(np.zeros(4, np.int32))


def test_run_wrapping_to_next_column_is_one_run():
    mask = np.zeros((3, 3), bool)
    mask[1:, 0] = True  # pixels 2, 3: bottom of the first column
    mask[0, 1] = True  # pixel 4: top of the second column
    mask[2, 2] = True  # pixel 9: the last pixel
    assert rle.encode(mask) == "2 3 9 1"
    np.testing.assert_array_equal(rle.decode("2 3 9 1", (3, 3)), mask)


def test_column_major_order():
    labels = np.array([[1, 0, 2], [0, 0, 2]])
    # Pixel (y, x) is number x * H + y + 1.
    assert rle.encode_labels(labels) == [(1, "1 1"), (2, "5 2")]


def test_single_pixel_and_full_image():
    mask = np.zeros((4, 5), bool)
    mask[3, 2] = True
    assert rle.encode(mask) == f"{2 * 4 + 3 + 1} 1"
    assert rle.encode(np.ones((4, 5), bool)) == "1 20"


def test_round_trip_objects_touching_every_border():
    labels = np.zeros((30, 40), np.int32)
    labels[:, 0] = 3  # left border, every row
    labels[0, 5:20] = 9  # top
    labels[-1, 5:20] = 12  # bottom
    labels[10:20, -1] = 40  # right
    labels[-1, -1] = 41  # last pixel
    labels[0, -1] = 42  # top-right corner
    rr, cc = disk((15, 20), 6)
    labels[rr, cc] = 100
    encoded = rle.encode_labels(labels)
    assert [label for label, _ in encoded] == [3, 9, 12, 40, 41, 42, 100]
    for label, text in encoded:
        np.testing.assert_array_equal(rle.decode(text, labels.shape), labels == label)
    decoded = rle.decode_labels([text for _, text in encoded], labels.shape)
    assert decoded.overlap_pixels == 0
    assert decoded.labels.dtype == np.int32
    # Object i comes back as label i + 1, so relabel the original consecutively.
    _, expected = np.unique(labels, return_inverse=True)
    np.testing.assert_array_equal(decoded.labels, expected.reshape(labels.shape))


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_random(seed):
    labels = random_labels(np.random.default_rng(seed), (64, 48), 20)
    encoded = rle.encode_labels(labels)
    decoded = rle.decode_labels([text for _, text in encoded], labels.shape).labels
    present = [label for label, _ in encoded]
    for i, label in enumerate(present):
        np.testing.assert_array_equal(decoded == i + 1, labels == label)
    assert (decoded == 0).sum() == (labels == 0).sum()


def test_decode_labels_first_object_wins_overlaps():
    shape = (4, 4)
    first = "1 6"  # pixels 1-6
    second = "5 4"  # pixels 5-8: 5 and 6 already taken
    third = "6 1 16 1"  # pixel 6 taken a third time, pixel 16 free
    decoded = rle.decode_labels([first, second, third], shape)
    flat = decoded.labels.ravel(order="F")
    np.testing.assert_array_equal(flat[:8], [1, 1, 1, 1, 1, 1, 2, 2])
    assert flat[15] == 3
    # Pixels 5 and 6 are each counted once, however many objects claim them.
    assert decoded.overlap_pixels == 2


def test_decode_labels_empty_string_leaves_label_unused():
    decoded = rle.decode_labels(["", "2 1"], (2, 2))
    np.testing.assert_array_equal(decoded.labels, [[0, 0], [2, 0]])
    assert rle.decode_labels([], (2, 3)).labels.shape == (2, 3)


def test_parse_values():
    starts, lengths = rle.parse(" 3 2\t10 1 ")
    np.testing.assert_array_equal(starts, [3, 10])
    np.testing.assert_array_equal(lengths, [2, 1])
    assert starts.dtype == lengths.dtype == np.int64
    assert rle.parse("")[0].size == 0
    # Touching runs are allowed; they do not overlap.
    rle.parse("1 2 3 2", (2, 2))


@pytest.mark.parametrize(
    ("text", "shape", "message"),
    [
        ("1 2 x 4", None, "non-integer token 'x' at position 3"),
        ("1 2.5", None, "non-integer token '2.5'"),
        ("1 1_000", None, "non-integer token '1_000'"),
        ("1 2 3", None, "odd number of tokens"),
        ("0 2", None, "run 1: start 0 is < 1"),
        ("1 2 -4 1", None, "run 2: start -4 is < 1"),
        ("1 2 5 0", None, "run 2: length 0 is < 1"),
        ("5 2 1 2", None, "starts not ascending: run 2"),
        ("5 2 5 1", None, "starts not ascending"),
        ("1 5 3 2", None, "runs overlap: run 2 starts at 3 but run 1 ends at 5"),
        ("1 99999999999999999999", None, "out of range"),
        ("9 2", (3, 3), "past the last pixel of a 3x3 image"),
    ],
)
def test_parse_errors(text, shape, message):
    with pytest.raises(rle.RLEError, match=message.replace("(", r"\(")):
        rle.parse(text, shape)


def test_decode_labels_error_names_object():
    with pytest.raises(rle.RLEError, match="object 2: odd number"):
        rle.decode_labels(["1 1", "3"], (2, 2))


def test_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        rle.decode("1 1", (0, 3))
    with pytest.raises(ValueError, match="shape"):
        rle.decode("1 1", (2.5, 3))
