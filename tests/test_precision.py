"""dtype `auto`: bf16 only where the hardware runs it fast; explicit dtypes are honoured."""

import pytest
import torch

from draftopd.errors import DraftOPDError
from draftopd.model import packed, precision
from draftopd.model.precision import Bf16Probe, auto_dtype, hardware_record, parse_dtype


@pytest.fixture
def probe(monkeypatch):
    """Pretend the CPU's bf16 matmul ran `speedup` times as fast as fp32."""

    def set_speedup(speedup: float):
        monkeypatch.setattr(precision, "probe_bf16", lambda: Bf16Probe(fp32_s=1.0, bf16_s=1.0 / speedup))

    return set_speedup


def test_auto_is_fp32_without_native_bf16(probe, monkeypatch):
    probe(1 / 38)  # an AVX2-only CPU: bf16 emulated, ~40x slower
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX2")
    dtype, why = auto_dtype("cpu")
    assert dtype == torch.float32
    assert "AVX2" in why and "38.0x slower" in why
    assert parse_dtype("auto") == torch.float32


def test_auto_is_bf16_with_native_bf16(probe):
    probe(4.0)
    assert auto_dtype("cpu")[0] == torch.bfloat16
    assert parse_dtype("auto", "cpu") == torch.bfloat16


def test_auto_needs_a_clear_gain(probe):
    probe(1.1)  # bf16 barely faster: not worth the precision
    assert parse_dtype("auto") == torch.float32


@pytest.mark.parametrize("slow_or_fast", [1 / 40, 4.0])
def test_explicit_dtypes_are_honoured(probe, slow_or_fast):
    probe(slow_or_fast)
    assert parse_dtype("fp32") == torch.float32
    assert parse_dtype("bf16") == torch.bfloat16
    assert parse_dtype(torch.float16) == torch.float16


def test_unknown_dtype_is_one_line():
    with pytest.raises(DraftOPDError, match="'fp8'.*expected auto"):
        parse_dtype("fp8")


def test_real_probe_is_consistent_with_its_decision():
    precision.probe_bf16.cache_clear()
    p = precision.probe_bf16()
    assert p.fp32_s > 0 and p.bf16_s > 0
    assert (auto_dtype("cpu")[0] == torch.bfloat16) == (p.speedup >= precision.BF16_MIN_GAIN)
    assert precision.probe_bf16() is p  # measured once per process


def test_hardware_record_names_the_cpu_and_how_its_linears_run(monkeypatch):
    rec = hardware_record(torch.float32, "cpu")
    assert rec["dtype"] == "float32" and rec["device"] == "cpu"
    assert rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert rec["linears"] == ("packed" if packed.packing_unavailable(torch.float32) is None else "plain")
    monkeypatch.setattr(packed, "packing_unavailable", lambda dtype: "not here")
    assert hardware_record(torch.float32, "cpu")["linears"] == "plain"


def test_load_target_auto_follows_the_probe(probe, tiny_dir):
    from draftopd.model.target import load_target

    probe(1 / 40)
    assert load_target(str(tiny_dir)).dtype == torch.float32
    probe(4.0)
    assert load_target(str(tiny_dir)).dtype == torch.bfloat16
    assert load_target(str(tiny_dir), dtype="fp32").dtype == torch.float32


def test_a_fallback_to_fp32_is_announced_once(probe, monkeypatch, tiny_dir, capsys):
    from draftopd.model import target as target_module

    monkeypatch.setattr(target_module, "_ANNOUNCED", set())
    probe(1 / 40)
    target_module.load_target(str(tiny_dir))
    target_module.load_target(str(tiny_dir))
    err = capsys.readouterr().err
    assert err.count("dtype auto -> float32: CPU") == 1 and "40.0x slower" in err
    probe(4.0)
    target_module.load_target(str(tiny_dir))
    assert capsys.readouterr().err == ""  # bf16 chosen: recorded in results, nothing to warn about
