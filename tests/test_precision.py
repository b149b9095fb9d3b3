"""Mixed precision only where the hardware computes it natively, and run.yaml says which."""

import pytest
import torch
import yaml

from nucleiseg.models import precision
from nucleiseg.models.runs import RUN_INFO, write_run_info

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_uses_bfloat16_only_with_native_instructions(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: native)
    expected = torch.bfloat16 if native else None
    assert precision.autocast_dtype(CPU, enabled=True) is expected
    assert precision.precision_name(CPU, True) == ("bfloat16" if native else "float32")
    with precision.autocast(CPU, enabled=True):
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.dtype == (torch.bfloat16 if native else torch.float32)


def test_disabled_is_float32_everywhere_and_cuda_is_float16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    assert precision.autocast_dtype(CPU, enabled=False) is None
    assert precision.autocast_dtype(CUDA, enabled=False) is None
    assert precision.autocast_dtype(CUDA, enabled=True) is torch.float16
    assert precision.precision_name(CUDA, True) == "float16"
    with precision.autocast(CPU, enabled=False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_run_info_records_precision_and_processor(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: False)
    write_run_info(tmp_path, fold=3, data_dir=tmp_path / "data", device=CPU, amp=True)
    info = yaml.safe_load((tmp_path / RUN_INFO).read_text())
    assert info["fold"] == 3
    assert info["precision"] == "float32"
    assert info["processor"] == precision.processor_name() != ""


def test_describe_machine_names_processor_threads_and_precision(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: False)
    text = precision.describe_machine(CPU)
    assert text == f"{precision.processor_name()}, {torch.get_num_threads()} CPU threads, float32"
