"""CPU linears with prepacked weights (`draftopd.model.packed`): the same results as `F.linear`,
the same parameters and state dict, safe when weights change or gradients are wanted, and the
embedded target loads packed and still decodes losslessly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from draftopd.model import packed
from draftopd.model.packed import PackedLinear, pack_linears, packing_unavailable, unpack_linears

needs_fp32 = pytest.mark.skipif(packing_unavailable(torch.float32) is not None,
                                reason=f"fp32 packing unavailable: {packing_unavailable(torch.float32)}")
DTYPES = [torch.float32] + ([torch.bfloat16] if packing_unavailable(torch.bfloat16) is None else [])


def packed_copy(lin: nn.Linear) -> nn.Linear:
    twin = copy.deepcopy(lin)
    assert pack_linears(twin) == 1 and type(twin) is PackedLinear
    return twin


@needs_fp32
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_as_f_linear_for_any_rows_and_rows_independent_of_the_call(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96).to(dtype)
    twin = packed_copy(lin)
    x = torch.randn(2, 8, 64, dtype=dtype)  # [batch, rows, in]
    with torch.no_grad():
        whole = twin(x)
        assert whole.shape == (2, 8, 96)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(whole, lin(x), atol=tol, rtol=tol)
        for n in (1, 2, 3, 4):  # a decode step's rows, one call each: bit-equal to the same rows in one call
            assert torch.equal(twin(x[0, :n]), whole[0, :n])


@needs_fp32
def test_a_changed_weight_is_repacked():
    lin = packed_copy(nn.Linear(16, 8))
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = lin(x)
        lin.weight.add_(1.0)  # an optimizer step changes weights in place
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
        assert not torch.allclose(lin(x), before)
        lin.weight.data = torch.zeros(8, 16)  # a new tensor, same version count
        torch.testing.assert_close(lin(x), lin.bias.expand(3, 8))


@needs_fp32
def test_gradients_flow_as_with_f_linear():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    twin = packed_copy(lin)
    x = torch.randn(3, 16, requires_grad=True)
    twin(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    lin(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(twin.weight.grad, lin.weight.grad)


@needs_fp32
def test_a_packed_model_keeps_its_parameters_ties_and_copies():
    from helpers import tiny_target

    model = tiny_target("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    assert pack_linears(model) == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert {n: p for n, p in model.named_parameters()} == params  # the very same tensors
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.arange(5)[None]
    with torch.no_grad():
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(ids).logits, model(ids).logits)
    assert pack_linears(model) == 0  # already packed: nothing plain left
    n = sum(type(m) is PackedLinear for m in model.modules())
    assert unpack_linears(model) == n and not any(type(m) is PackedLinear for m in model.modules())
    assert not any("_packed" in vars(m) for m in model.modules())  # the copies are dropped
    assert not any(m.weight in packed._PACKED for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin(ids).logits)


def test_unavailable_or_too_big_leaves_the_model_alone_with_one_line(monkeypatch, capsys):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    monkeypatch.setattr(packed, "packing_unavailable", lambda dtype: "oneDNN refuses it here")
    assert pack_linears(model) == 0 and all(type(m) is nn.Linear for m in model)
    assert capsys.readouterr().err.strip().splitlines() == [
        "draftopd: torch.float32 CPU linears stay unpacked (oneDNN refuses it here)"]
    monkeypatch.setattr(packed, "packing_unavailable", lambda dtype: None)
    monkeypatch.setattr(packed, "_physical_memory", lambda: 100)  # bytes: 96 of weights need more than a quarter
    assert pack_linears(model) == 0 and all(type(m) is nn.Linear for m in model)
    err = capsys.readouterr().err
    assert "would need a second copy" in err and len(err.strip().splitlines()) == 1


@needs_fp32
def test_the_embedded_target_loads_packed_with_the_same_logits(smollm):
    """Every linear of the fp32 SmolLM2 is packed; its logits match the unpacked model's."""
    from transformers import AutoModelForCausalLM

    from draftopd.model.target import resolve_target

    assert sum(type(m) is PackedLinear for m in smollm.model.modules()) == 211  # 30 layers x 7 + LM head
    plain = AutoModelForCausalLM.from_pretrained(resolve_target("smollm2-135m"), dtype=torch.float32).eval()
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = smollm.model(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@needs_fp32
@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_linear_matches_f_linear_forward_backward_and_transposed(dtype):
    """The training losses' LM head: packed once per weight and layout, repacked after a change."""
    from draftopd.model.packed import frozen_linear, packed_copy

    torch.manual_seed(0)
    w = torch.randn(40, 24).to(dtype)
    x = torch.randn(6, 24).to(dtype).requires_grad_(True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    y = frozen_linear(x, w)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, w)
    torch.testing.assert_close(y, ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    y.backward(g), ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, atol=tol, rtol=tol)
    dz = torch.randn(6, 40).to(dtype)
    torch.testing.assert_close(frozen_linear(dz, w, transposed=True), dz @ w, atol=tol, rtol=tol)
    assert packed_copy(w) is packed_copy(w)  # made once
    with torch.no_grad():
        w.mul_(2)
        torch.testing.assert_close(frozen_linear(x, w), F.linear(x, w), atol=2 * tol, rtol=tol)
