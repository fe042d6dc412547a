"""Linear layer + softmax cross-entropy without the N x K logits: cross_entropy(input @ linear_weight.T + bias, target).

Arguments follow `torch.nn.functional.linear_cross_entropy` (torch >= 2.13): `linear_weight` is [K, d] as in
F.linear, `linear_bias` [K], `weight` the per-class loss weights, and the cross-entropy options mean what they
mean in `fastcls.ops.cross_entropy` (torch's semantics; a mean over no kept rows is 0).

The rows are processed in chunks: a chunk's logits are computed by one matrix product into a reused buffer, the
cross-entropy kernel (C++ on CPU, Triton on CUDA) writes the chunk's loss and overwrites its logits with their
gradient, and two more products give that chunk's grad_input rows and add its share of grad_weight into an fp32
accumulator. Extra memory is that buffer plus the fp32 accumulator, whatever N. For "mean" and "sum" all of
this happens in the forward and the backward only scales the gradients by the upstream one (nothing to do when
it is exactly 1, the usual case, checked without a host sync on CUDA) and casts them to their tensors' dtypes;
they are handed over once, so a second eager backward through the same graph raises. For "none", whose upstream
gradient differs per row, the forward computes the losses only and the backward recomputes each chunk.

The chunk loops run inside torch.library custom ops, so torch.compile traces through them and CUDA graphs
capture them:

- "fastcls::linear_cross_entropy_forward"(input, linear_weight, target, linear_bias, weight, ignore_index,
  label_smoothing, reduction, backend, chunk_size, compute_dtype, grad_input, grad_weight, grad_bias) ->
  (loss, grad_input, grad_weight, grad_bias): the loss and the gradients asked for, for an upstream gradient of 1
  (grad_input in the compute dtype, the others fp32 accumulators; empty tensors where not asked for, and always
  for "none"); its autograd scales them as `fastcls.ops.cross_entropy` scales its gradient or, for "none", calls
- "fastcls::linear_cross_entropy_backward"(input, linear_weight, target, linear_bias, weight, ignore_index,
  label_smoothing, backend, chunk_size, compute_dtype, grad_output, grad_input, grad_weight, grad_bias) ->
  (grad_input, grad_weight, grad_bias), in the dtypes of the tensors they belong to (empty where not asked for).

`chunk_size` 0 there picks the default; in eager mode the implementations run without the dispatcher, as in
`fastcls.ops.cross_entropy`.

Under autocast the products run in the autocast dtype, as F.linear's would; the gradients come back in the
dtypes of the tensors they belong to. The op is registered with `fastcls.ops.dispatch` as taking what the
cross-entropy kernels take, in the products' dtype; others (fp64) run the reference.
"""
import torch
from torch.autograd.function import once_differentiable

from fastcls.ops import dispatch
from fastcls.ops.cross_entropy import (
    CONSUMED_GRADIENT,
    RowKernel,
    check_options,
    check_target,
    check_target_range_eagerly,
    cross_entropy_reference,
    reduce_rows,
    scale_gradient,
)
from fastcls.ops.library import KernelOp

dispatch.register_op("linear_cross_entropy", **dispatch.kernel_dtypes("cross_entropy"))

# Rows per chunk aim at this many bytes of logits: enough rows for the products to run near their peak rate
# (each chunk's three products read the whole weight), few enough that the buffer stays small next to what the
# unchunked logits would take. A GPU needs far more rows than a CPU to keep its matrix units busy.
CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}
MIN_CHUNK_ROWS = 64


def chunk_rows(n_rows: int, n_classes: int, element_size: int, device_type: str, chunk_size: int | None = None) -> int:
    if chunk_size is not None:
        return max(1, min(chunk_size, n_rows))
    by_bytes = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]) // max(1, n_classes * element_size)
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, by_bytes)))


def linear_cross_entropy_reference(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """F.linear then fastcls's reference cross-entropy: materialises the logits, differentiable by autograd."""
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    return cross_entropy_reference(logits, target, weight, ignore_index, label_smoothing, reduction)


def _check_inputs(input, linear_weight, target, linear_bias, weight, label_smoothing, reduction) -> None:
    if input.ndim != 2:
        raise ValueError(f"input must be [N, d], got shape {tuple(input.shape)}")
    if linear_weight.ndim != 2 or linear_weight.shape[1] != input.shape[1]:
        raise ValueError(f"linear_weight must be [K, d] with d = {input.shape[1]} (as in F.linear), "
                         f"got shape {tuple(linear_weight.shape)}")
    n_classes = linear_weight.shape[0]
    if linear_bias is not None and linear_bias.shape != (n_classes,):
        raise ValueError(f"linear_bias must be [K] = ({n_classes},), got shape {tuple(linear_bias.shape)}")
    check_target(target, input.shape[0])
    check_options(n_classes, weight, label_smoothing, reduction)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


class _Chunked:
    """The chunk loop shared by the forward ("mean"/"sum") and the backward ("none")."""

    def __init__(self, kernel: RowKernel, x, w, b, target, chunk: int):
        self.kernel, self.x, self.w, self.b, self.target, self.chunk = kernel, x, w, b, target, chunk

    def run(self, grad_scale, row_scale: torch.Tensor | None, needs: tuple[bool, bool, bool], loss_rows=None):
        """Writes per-row losses into `loss_rows` (unless None) and returns (grad_x, grad_w_fp32, grad_b_fp32),
        each None unless `needs` asks for it. Gradients are grad_scale times the loss's, times row_scale[i]
        per row when given."""
        x, w = self.x, self.w
        n_rows, n_classes = x.shape[0], w.shape[0]
        need_x, need_w, need_b = needs
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=x.device) if need_w else None
        grad_b = torch.zeros(n_classes, dtype=torch.float32, device=x.device) if need_b else None
        buffer = torch.empty((min(self.chunk, n_rows), n_classes), dtype=x.dtype, device=x.device)
        # The products write into preallocated buffers (out=), which autocast refuses; x, w and b already have
        # the compute dtype.
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, n_rows, self.chunk):
                end = min(start + self.chunk, n_rows)
                logits = buffer[: end - start]
                self._logits(start, end, logits)
                rows = self.kernel.rows(logits, self.target[start:end], logits if any(needs) else None, grad_scale)
                if loss_rows is not None:
                    loss_rows[start:end] = rows
                if not any(needs):
                    continue
                if row_scale is not None:
                    logits.mul_(row_scale[start:end].to(logits.dtype).unsqueeze(1))
                if need_x:
                    torch.mm(logits, w, out=grad_x[start:end])
                if need_w:
                    if x.dtype == torch.float32:
                        grad_w.addmm_(logits.t(), x[start:end])
                    else:  # a low-precision product is rounded once per chunk, then summed in fp32
                        grad_w += torch.mm(logits.t(), x[start:end])
                if need_b:
                    grad_b += logits.sum(0, dtype=torch.float32)
        return grad_x, grad_w, grad_b

    def _logits(self, start: int, end: int, out: torch.Tensor) -> None:
        if self.b is None:
            torch.mm(self.x[start:end], self.w.t(), out=out)
        else:
            torch.addmm(self.b, self.x[start:end], self.w.t(), out=out)


def _operands(input, linear_weight, linear_bias, compute_dtype):
    """x, w, b in the products' dtype, laid out as the chunk loop reads them."""
    x = input.to(compute_dtype).contiguous()
    w = linear_weight.to(compute_dtype).contiguous()
    return x, w, None if linear_bias is None else linear_bias.to(compute_dtype)


def _forward_impl(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                  linear_bias: torch.Tensor | None, weight: torch.Tensor | None, ignore_index: int,
                  label_smoothing: float, reduction: str, backend: str, chunk_size: int, compute_dtype: torch.dtype,
                  grad_input: bool, grad_weight: bool,
                  grad_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, w, b = _operands(input, linear_weight, linear_bias, compute_dtype)
    n_rows, n_classes = x.shape[0], w.shape[0]
    kernel = RowKernel(backend, n_classes, weight, ignore_index, label_smoothing, x.device)
    divisor, mean_scale = kernel.mean_divisor(target, reduction)
    chunked = _Chunked(kernel, x, w, b, target, chunk_rows(n_rows, n_classes, x.element_size(), x.device.type,
                                                           chunk_size or None))
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grads = chunked.run(mean_scale if reduction == "mean" else None, None, (grad_input, grad_weight, grad_bias),
                        loss_rows)
    return (reduce_rows(loss_rows, reduction, divisor), *(input.new_empty(0) if g is None else g for g in grads))


def _forward_fake(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, reduction,
                  backend, chunk_size, compute_dtype, grad_input, grad_weight, grad_bias):
    loss = input.new_empty(input.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    n_classes = linear_weight.shape[0]
    return (loss, input.new_empty(input.shape, dtype=compute_dtype) if grad_input else input.new_empty(0),
            input.new_empty(linear_weight.shape, dtype=torch.float32) if grad_weight else input.new_empty(0),
            input.new_empty((n_classes,), dtype=torch.float32) if grad_bias else input.new_empty(0))


def _setup_forward(ctx, inputs, output):
    (input, linear_weight, target, linear_bias, weight, ctx.ignore_index, ctx.label_smoothing, ctx.reduction,
     ctx.backend, ctx.chunk_size, ctx.compute_dtype, *_) = inputs
    _, *grads = output
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    ctx.dtypes = (input.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
    if ctx.reduction == "none":
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight)
    else:
        ctx.grads = grads


@once_differentiable
def _backward(ctx, grad_loss, *_grads_of_grads):
    needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    if ctx.reduction == "none":
        input, linear_weight, target, linear_bias, weight = ctx.saved_tensors
        grads = _backward_op(input, linear_weight, target, linear_bias, weight, ctx.ignore_index,
                             ctx.label_smoothing, ctx.backend, ctx.chunk_size, ctx.compute_dtype, grad_loss, *needs)
    else:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(CONSUMED_GRADIENT)
        grads = [scale_gradient(grad, grad_loss, ctx.backend) if need else None for grad, need in zip(grads, needs)]
    grad_x, grad_w, grad_b = (grad.to(dtype) if need else None for grad, need, dtype in zip(grads, needs, ctx.dtypes))
    return grad_x, grad_w, None, grad_b, None, None, None, None, None, None, None, None, None, None


def _backward_impl(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                   linear_bias: torch.Tensor | None, weight: torch.Tensor | None, ignore_index: int,
                   label_smoothing: float, backend: str, chunk_size: int, compute_dtype: torch.dtype,
                   grad_output: torch.Tensor, grad_input: bool, grad_weight: bool,
                   grad_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, w, b = _operands(input, linear_weight, linear_bias, compute_dtype)
    kernel = RowKernel(backend, w.shape[0], weight, ignore_index, label_smoothing, x.device)
    chunked = _Chunked(kernel, x, w, b, target, chunk_rows(x.shape[0], w.shape[0], x.element_size(), x.device.type,
                                                           chunk_size or None))
    grads = chunked.run(None, grad_output.float(), (grad_input, grad_weight, grad_bias))
    # A gradient already in its tensor's dtype is the loop's own fresh buffer, which .to returns as is.
    return tuple(input.new_empty(0) if g is None else g.to(t.dtype)
                 for g, t in zip(grads, (input, linear_weight, linear_bias)))


def _backward_fake(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, backend,
                   chunk_size, compute_dtype, grad_output, grad_input, grad_weight, grad_bias):
    return tuple(t.new_empty(t.shape) if need else input.new_empty(0)
                 for t, need in ((input, grad_input), (linear_weight, grad_weight), (linear_bias, grad_bias)))


_backward_op = KernelOp("linear_cross_entropy_backward", _backward_impl, _backward_fake)
_forward_op = KernelOp("linear_cross_entropy_forward", _forward_impl, _forward_fake).with_autograd(_backward,
                                                                                                  _setup_forward)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str | None = None,
    validate: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...) for input [N, d], linear_weight
    [K, d], without materialising the [N, K] logits (see the module docstring). `chunk_size`: rows per chunk
    (default: about 16 MiB of logits on the CPU, 256 MiB on CUDA, at least 64 rows)."""
    _check_inputs(input, linear_weight, target, linear_bias, weight, label_smoothing, reduction)
    dtype = _compute_dtype(input, linear_weight, *(() if linear_bias is None else (linear_bias,)))
    backend = dispatch.backend_for("linear_cross_entropy", input.device, dtype, backend=backend)
    if backend == "reference":
        return linear_cross_entropy_reference(input, linear_weight, target, linear_bias, weight, ignore_index,
                                              label_smoothing, reduction)
    target = target.to(torch.int64).contiguous()
    if validate and backend == "triton":
        check_target_range_eagerly(target, linear_weight.shape[0], ignore_index)
    # Gradients of "mean" and "sum" come out of the forward; those of "none" out of the backward's recomputation.
    in_forward = reduction != "none" and torch.is_grad_enabled()
    loss, *_ = _forward_op(input, linear_weight, target, linear_bias, weight, ignore_index, float(label_smoothing),
                           reduction, backend, 0 if chunk_size is None else max(1, chunk_size), dtype,
                           in_forward and input.requires_grad, in_forward and linear_weight.requires_grad,
                           in_forward and linear_bias is not None and linear_bias.requires_grad)
    return loss
