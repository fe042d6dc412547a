"""The capture-readiness of the dropout and LayerNorm ops: masks from a device-side generator, identical on every
backend; the ops as torch.library custom ops (opcheck); torch.compile tracing patched layers without breaks."""
import pytest
import torch
from tiny import encoded_rows, tiny_encoder

from fastcls import patch
from fastcls.data import collate
from fastcls.models.classifier import EncoderClassifier
from fastcls.ops import dropout, dropout_add_layer_norm, layer_norm_dropout
from fastcls.ops.dropout import DropoutGenerator, _dropout_op, keep_mask, use_generator
from fastcls.ops.dropout_add_layer_norm import _backward_op, _forward_op

KERNEL_BACKENDS = ["reference", "cpp", "triton"]


def counters(numel: int) -> int:
    return (numel + 3) // 4


def layer_norm_params(hidden, generator):
    weight = (torch.rand(hidden, generator=generator) + 0.5).requires_grad_()
    bias = (torch.randn(hidden, generator=generator) * 0.1).requires_grad_()
    return weight, bias


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_generator_hands_each_call_of_a_step_its_own_counters_and_moves_on_after_the_step(backend, generator):
    x = torch.randn(13, 7, generator=generator, requires_grad=True)
    rng = DropoutGenerator(seed=2**63 + 12345)  # a key past int64's range: its bits go through signed int64
    with use_generator(rng):
        first, second = dropout(x, 0.3, backend=backend), dropout(x, 0.3, backend=backend)
        first.sum().backward()
        rng.end_step()
        third = dropout(x, 0.3, backend=backend)
    n = counters(x.numel())
    assert torch.equal(first != 0, keep_mask(x.shape, 0.3, 2**63 + 12345))
    assert torch.equal(second != 0, keep_mask(x.shape, 0.3, 2**63 + 12345, offset=n))
    assert torch.equal(third != 0, keep_mask(x.shape, 0.3, 2**63 + 12345, offset=2 * n))
    assert torch.equal(x.grad != 0, first != 0)  # the backward redrew the forward's mask
    assert rng.state[1].item() == 2 * n and rng.step_counters == n


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_the_kernels_read_the_generators_state_tensor_at_each_call(backend, generator):
    """What a CUDA graph replay relies on: the kernels take seed and base from the tensor, not from the host."""
    x = torch.randn(5, 9, generator=generator)
    weight, bias = layer_norm_params(9, generator)
    rng = DropoutGenerator(seed=7)
    with use_generator(rng):
        rng.state.copy_(torch.tensor([99, 40]))
        out = dropout(x, 0.5, backend=backend)
        rng.step_counters = 0
        normed = layer_norm_dropout(x, weight, bias, 0.5, backend=backend)
    assert torch.equal(out != 0, keep_mask(x.shape, 0.5, 99, offset=40))
    assert torch.equal(normed != 0, keep_mask(x.shape, 0.5, 99, offset=40))


@pytest.mark.parametrize("hidden", [8, 7])  # 7: rows that do not start on a Philox counter
def test_every_backend_draws_the_generators_masks_alike_forward_and_backward(hidden, generator):
    x = torch.randn(6, hidden, generator=generator)
    residual = torch.randn(6, hidden, generator=generator)
    weight, bias = layer_norm_params(hidden, generator)
    upstream = torch.randn(6, hidden, generator=generator)
    results = {}
    for backend in KERNEL_BACKENDS:
        inputs = [t.detach().clone().requires_grad_() for t in (x, residual, weight, bias)]
        rng = DropoutGenerator(seed=31)
        rng.state[1] = 1000  # a base counter as after some steps
        with use_generator(rng):
            out = dropout_add_layer_norm(*inputs, 0.4, eps=1e-5, backend=backend)
            out = layer_norm_dropout(out, inputs[2], inputs[3], 0.3, eps=1e-5, backend=backend)
        out.backward(upstream)
        results[backend] = [out.detach()] + [t.grad for t in inputs]
    for backend in ("cpp", "triton"):
        for got, want in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_kernels_draw_the_generators_masks_as_the_reference(generator):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.randn(6, 9, generator=generator)
    weight, bias = layer_norm_params(9, generator)
    outs = []
    for device in ("cpu", "cuda"):
        rng = DropoutGenerator(seed=77, device=device)
        rng.state[1] = 123
        with use_generator(rng):
            args = [t.detach().to(device) for t in (x, weight, bias)]
            outs.append([dropout(args[0], 0.3, backend="reference" if device == "cpu" else None).cpu(),
                         layer_norm_dropout(*args, 0.3, backend="reference" if device == "cpu" else None).cpu()])
    for got, want in zip(outs[1], outs[0]):
        assert torch.equal(got != 0, want != 0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_backward_after_the_step_ended_fails_instead_of_drawing_another_mask(generator):
    x = torch.randn(4, 8, generator=generator, requires_grad=True)
    weight, bias = layer_norm_params(8, generator)
    rng = DropoutGenerator(seed=1)
    with use_generator(rng):
        out = dropout_add_layer_norm(x, x, weight, bias, 0.2) + dropout(x, 0.2)
        rng.end_step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("packed", [False, True])
def test_checkpointed_layers_redraw_the_generators_masks(packed):
    results = []
    for checkpointing in (False, True):
        model = EncoderClassifier(tiny_encoder("bert", dropout=0.3), num_labels=3, dropout=0.3,
                                  packed=packed).train()
        if checkpointing:
            model.enable_checkpointing()
        with use_generator(DropoutGenerator(seed=5)):
            loss, _ = model(collate(encoded_rows([7, 3, 9], seed=4), [0, 1, 2], packed=packed, pad_token_id=1))
            loss.backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def _opcheck(op, args):
    verdict = torch.library.opcheck(op.op, args)
    assert all(v == "SUCCESS" for v in verdict.values()), verdict


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("from_generator", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_passes_for_the_dropout_op(backend, from_generator, dtype, generator):
    rng = torch.tensor([-5, 77]) if from_generator else None
    x = torch.randn(5, 3, generator=generator).to(dtype).requires_grad_()
    _opcheck(_dropout_op, (x, rng, 0 if from_generator else -(2**62), 3, 0.4, backend))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("save_from", ["input", "sum", "output"])
@pytest.mark.parametrize("from_generator", [False, True])
def test_opcheck_passes_for_the_layer_norm_ops(backend, save_from, from_generator, generator):
    rng = torch.tensor([11, 3]) if from_generator else None
    dropout_after = save_from == "input"
    x = torch.randn(5, 7, generator=generator, requires_grad=True)
    residual = None if dropout_after else torch.randn(5, 7, generator=generator, requires_grad=True)
    weight, bias = layer_norm_params(7, generator)
    args = (x, residual, weight, bias, 1e-5, 0.3, rng, 9, 2, dropout_after, torch.float32, save_from == "sum",
            save_from, backend)
    _opcheck(_forward_op, args)
    out, summed, mean, rstd = _forward_op.impl(*args)
    saved = {"input": x, "sum": summed, "output": out}[save_from].detach()
    grad_sum = None if dropout_after else torch.randn(5, 7, generator=generator)
    _opcheck(_backward_op, (torch.randn(5, 7, generator=generator), saved, save_from == "output", weight.detach(),
                            bias.detach(), mean, rstd, grad_sum, rng, 9, 2, 0.3, dropout_after, torch.float32,
                            None if dropout_after else torch.float32, backend))


def _patched_tiny_bert():
    model = tiny_encoder("bert", dropout=0.2, layers=2).train()
    patch(model)
    return model


def test_a_patched_encoder_traces_without_a_graph_break():
    model = _patched_tiny_bert()
    ids = torch.randint(2, 99, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    with use_generator(DropoutGenerator(seed=3)):
        explanation = torch._dynamo.explain(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state)()
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("packed", [False, True])
def test_a_compiled_patched_layer_trains_as_the_eager_one(packed):
    """torch.compile(fullgraph=True) of one layer of the layer-by-layer encoder with fastcls's kernels: same output
    and gradients as eager with the same generator state (aot_eager: traced through the fake kernels and the
    registered autograd, without inductor's C++ compile time)."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = EncoderClassifier(tiny_encoder("bert", dropout=0.2), num_labels=3, dropout=0.2,
                                  packed=packed).train()
        batch = collate(encoded_rows([6, 9, 4], seed=1), [0, 1, 2], packed=packed, pad_token_id=1)
        layer = model.body.layer
        if compiled:
            layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
        h = torch.randn(batch.input_ids.shape[0], 32, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        with use_generator(DropoutGenerator(seed=8)):
            out = layer(1, h, batch)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), h.grad, grads))
    (out, h_grad, grads), (c_out, c_h_grad, c_grads) = results
    torch.testing.assert_close(c_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_h_grad, h_grad, atol=1e-5, rtol=1e-5)
    assert c_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(c_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
