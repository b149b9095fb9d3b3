"""Watershed thresholds of their own for some imaging modalities: read, picked per image,
tuned per group of modalities, and used by every path that turns maps into nuclei."""

import numpy as np
import pytest
import yaml
from skimage.draw import disk

from nucleiseg.data.targets import make_targets
from nucleiseg.inference import ensemble
from nucleiseg.inference.family import (
    ByModality,
    as_dict,
    get_family,
    image_thresholds,
    read_params,
    thresholds_for,
)
from nucleiseg.postprocessing.tuning import tune_by_modality
from nucleiseg.postprocessing.watershed import PostprocessParams

UNETPP = get_family("unetpp")


def write_yaml(path, values) -> None:
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def test_thresholds_by_modality_are_read_and_written_back(tmp_path):
    path = tmp_path / "postprocess.yaml"
    own = {"tissue": {"min_size": 60}, "brightfield": {"min_size": 60, "seed_threshold": 0.9}}
    write_yaml(path, {"mask_threshold": 0.4, "modalities": own})
    params = read_params(path, UNETPP)
    assert isinstance(params, ByModality)
    assert params.default == PostprocessParams(mask_threshold=0.4)
    assert params.get("fluorescence") == params.default
    assert params.get("tissue") == PostprocessParams(mask_threshold=0.4, min_size=60)
    brightfield = params.get("brightfield")
    assert (brightfield.mask_threshold, brightfield.min_size, brightfield.seed_threshold) == (
        0.4,
        60,
        0.9,
    )
    # Written back, only what differs from the default is under modalities.
    written = as_dict(params)
    assert written["modalities"] == own and written["mask_threshold"] == 0.4
    write_yaml(path, written)
    assert read_params(path, UNETPP) == params
    # A file without modalities reads as before.
    write_yaml(path, {"min_size": 12})
    assert read_params(path, UNETPP) == PostprocessParams(min_size=12)


@pytest.mark.parametrize(
    "modalities,message",
    [
        ({"phase": {"min_size": 3}}, "unknown modalities phase; choose from fluorescence"),
        ({"tissue": {"min_sise": 3}}, "modalities: tissue: not unetpp settings: min_sise"),
        ({"tissue": 3}, "modalities: tissue: must be a mapping"),
        ([], "modalities must map modalities"),
    ],
)
def test_bad_thresholds_by_modality_are_refused_naming_the_file(tmp_path, modalities, message):
    path = tmp_path / "postprocess.yaml"
    write_yaml(path, {"min_size": 12, "modalities": modalities})
    with pytest.raises(ValueError, match=message) as error:
        read_params(path, UNETPP)
    assert str(path) in str(error.value)


def grey(value: int) -> np.ndarray:
    return np.full((32, 32, 3), value, np.uint8)


def test_each_image_gets_the_thresholds_of_its_modality():
    default, light = PostprocessParams(), PostprocessParams(min_size=60)
    params = {"unetpp": ByModality(default, (("brightfield", light), ("tissue", light)))}
    assert image_thresholds(params, grey(15)) == {"unetpp": default}  # dark: fluorescence
    assert image_thresholds(params, grey(200)) == {"unetpp": light}  # light grey: brightfield
    stained = grey(200)
    stained[..., 1] = 120  # light and coloured: tissue
    assert image_thresholds(params, stained) == {"unetpp": light}
    assert thresholds_for(params, "tissue") == {"unetpp": light}
    # Plain thresholds are every image's.
    assert image_thresholds({"unetpp": light}, grey(15)) == {"unetpp": light}
    # Maps are never made into nuclei before an image's own thresholds are picked.
    with pytest.raises(TypeError, match="thresholds by modality"):
        UNETPP.to_labels(np.zeros((3, 8, 8), np.float32), params["unetpp"])


def test_segment_image_predicts_with_the_image_modality_thresholds(monkeypatch):
    seen = []
    monkeypatch.setattr(
        ensemble, "_segment_once", lambda m, image, params, *rest: seen.append(params) or image
    )
    default, light = PostprocessParams(), PostprocessParams(min_size=60)
    params = {"unetpp": ByModality(default, (("brightfield", light),))}
    ensemble.segment_image([], grey(15), params, device=None)
    ensemble.segment_image([], grey(200), params, device=None)
    assert seen == [{"unetpp": default}, {"unetpp": light}]


def haloed_maps(labels: np.ndarray, core: float, rim: float, halo: float) -> np.ndarray:
    """Targets of ``labels`` whose body map is ``core`` in each nucleus's centre, ``rim``
    over the rest of it and ``halo`` in a 2 px ring outside it."""
    maps = make_targets(labels).astype(np.float32)
    body = np.where(labels > 0, rim, 0.0).astype(np.float32)
    for label in range(1, labels.max() + 1):
        ys, xs = np.nonzero(labels == label)
        centre = (int(ys.mean()), int(xs.mean()))
        grown = np.zeros(labels.shape, bool)
        grown[disk(centre, 9, shape=labels.shape)] = True
        body[grown & (labels == 0)] = halo
        body[disk(centre, 3, shape=labels.shape)] = core
    maps[0] = body
    return maps


def test_tuning_by_modality_keeps_a_group_own_thresholds_only_where_they_gain():
    labels = np.zeros((48, 48), np.int32)
    for label, center in enumerate([(12, 12), (12, 34), (34, 22)], start=1):
        labels[disk(center, 7, shape=labels.shape)] = label
    # Fluorescence maps are faint over the nucleus outside its core: a mask threshold
    # under 0.45 draws the whole nucleus. Tissue maps glow 0.55 in a ring around it:
    # 0.6 leaves the ring out. The thresholds of all images (0.5) fit neither.
    faint = haloed_maps(labels, core=0.95, rim=0.45, halo=0.0)
    glowing = haloed_maps(labels, core=0.95, rim=0.95, halo=0.55)
    raws = {"f1": faint, "f2": faint, "t1": glowing, "b1": glowing}
    truth = dict.fromkeys(raws, labels)
    modality_of = {"f1": "fluorescence", "f2": "fluorescence", "t1": "tissue", "b1": "brightfield"}
    start = PostprocessParams(mask_threshold=0.5)
    grid = {"mask_threshold": (0.3, 0.4, 0.5, 0.6)}
    own, groups = tune_by_modality(raws, truth, modality_of, start, grid=grid)
    assert own["fluorescence"].mask_threshold in (0.3, 0.4)
    assert own["tissue"] == own["brightfield"] and own["tissue"].mask_threshold == 0.6
    assert list(groups["group"]) == ["fluorescence", "brightfield and tissue"]
    assert list(groups["images"]) == [2, 2] and groups["kept"].all()
    assert (groups["tuned"] > groups["start"]).all()
    # A group whose own thresholds gain less than min_gain keeps those of all images.
    own, groups = tune_by_modality(raws, truth, modality_of, own["tissue"], grid=grid)
    assert set(own) == {"fluorescence"} and not groups["kept"].iloc[1]
