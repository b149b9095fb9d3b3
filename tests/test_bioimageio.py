"""The bioimage.io model package of a U-Net++ fold: validated by bioimageio.spec offline,
and its TorchScript weights, fed the test input through the rdf's own preprocessing,
give the test output.
"""

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT
from helpers import refused, run_script, tiny_config

from nucleiseg.data.dataset import IMAGE_MEAN, IMAGE_STD
from nucleiseg.training import bioimageio

WEIGHTS = REPO_ROOT / "weights"


def apply_preprocessing(raw: np.ndarray, steps: list[dict]) -> np.ndarray:
    """The rdf's preprocessing steps, as a bioimage.io tool applies them (fixed input_norm)."""
    for step in steps:
        assert step["id"] == "scale_linear" and step["kwargs"]["axis"] == "channel"
        gain = np.array(step["kwargs"]["gain"], np.float32)[None, :, None, None]
        offset = np.array(step["kwargs"]["offset"], np.float32)[None, :, None, None]
        raw = raw * gain + offset
    return raw


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "unetpp_fold0"
    run_script("export_bioimageio", ["--weights", WEIGHTS, "--fold", 0, "--out", out])
    return out


@pytest.mark.slow
def test_the_package_is_valid_for_bioimageio_spec_offline(package):
    spec = pytest.importorskip("bioimageio.spec")
    description = spec.load_description(package / bioimageio.RDF, perform_io_checks=True)
    assert description.validation_summary.status == "valid-format", description.validation_summary
    assert sorted(p.name for p in package.iterdir()) == sorted(bioimageio.PACKAGE_FILES)


@pytest.mark.slow
def test_torchscript_weights_reproduce_the_test_output(package):
    rdf = yaml.safe_load((package / bioimageio.RDF).read_text())
    (tensor,), (output,) = rdf["inputs"], rdf["outputs"]
    raw = np.load(package / tensor["test_tensor"]["source"])
    expected = np.load(package / output["test_tensor"]["source"])
    assert raw.shape == (1, 3, 256, 256) and raw.dtype == np.float32 and raw.max() <= 255
    model = torch.jit.load(package / rdf["weights"]["torchscript"]["source"])
    with torch.no_grad():
        logits = model(torch.from_numpy(apply_preprocessing(raw, tensor["preprocessing"])))
    assert output["postprocessing"] == [{"id": "sigmoid"}]
    np.testing.assert_allclose(torch.sigmoid(logits).numpy(), expected, atol=1e-4)
    assert expected.shape == (1, 3, 256, 256)


@pytest.mark.slow
def test_the_rdf_states_the_normalization_and_names_the_watershed(package):
    rdf = yaml.safe_load((package / bioimageio.RDF).read_text())
    (tensor,), (output,) = rdf["inputs"], rdf["outputs"]
    assert rdf["type"] == "model" and rdf["format_version"].startswith("0.5.")
    assert [axis["type"] for axis in tensor["axes"]] == ["batch", "channel", "space", "space"]
    assert output["axes"][1]["channel_names"] == ["body", "border", "separation"]
    (step,) = tensor["preprocessing"]
    np.testing.assert_allclose(step["kwargs"]["gain"], 1 / (255 * IMAGE_STD), rtol=1e-6)
    np.testing.assert_allclose(step["kwargs"]["offset"], -IMAGE_MEAN / IMAGE_STD, rtol=1e-6)
    readme = (package / rdf["documentation"]).read_text()
    assert "seeded watershed" in readme and "seed_threshold" in readme
    assert set(rdf["config"]["nucleiseg"]["watershed"]) >= {"seed_threshold", "min_size"}
    assert rdf["config"]["nucleiseg"]["input_norm"]["mode"] == "fixed"


def test_percentile_input_norm_is_stated_as_preprocessing():
    steps = bioimageio.preprocessing(tiny_config(input_norm={"mode": "percentile", "high": 99.0}))
    assert [step["id"] for step in steps] == ["scale_range", "clip", "scale_linear"]
    assert steps[0]["kwargs"]["max_percentile"] == 99.0
    np.testing.assert_allclose(steps[2]["kwargs"]["gain"], 1 / IMAGE_STD, rtol=1e-6)


def test_bad_exports_are_refused_before_a_model_is_built(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a model was built before the inputs were checked")

    monkeypatch.setattr(bioimageio, "build_model", no_build)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "tiny.png").write_bytes(b"not a png")
    problems = refused(
        "export_bioimageio", ["--weights", WEIGHTS, "--fold", 9, "--out", tmp_path / "full"]
    )
    assert any("--fold 9" in p for p in problems)
    problems = refused(
        "export_bioimageio",
        ["--weights", WEIGHTS, "--out", tmp_path / "full", "--test-image", tmp_path / "tiny.png"],
    )
    assert any("holds other files" in p for p in problems)
    assert any("--test-image" in p for p in problems)
    problems = refused(
        "export_bioimageio",
        ["--weights", WEIGHTS, "--run", "maskrcnn_r18_generalized", "--out", tmp_path / "new"],
    )
    assert any("no such run" in p for p in problems)
    mask_rcnn = WEIGHTS.parent / "runs" / "maskrcnn_r18_generalized"
    problems = refused("export_bioimageio", ["--weights", mask_rcnn, "--out", tmp_path / "new"])
    assert any("no U-Net++ run" in p for p in problems)
    assert not (tmp_path / "new").exists()
