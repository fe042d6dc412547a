"""Linear layer + softmax cross-entropy without the N x K logits: cross_entropy(input @ linear_weight.T + bias, target).

Arguments follow `torch.nn.functional.linear_cross_entropy` (torch >= 2.13): `linear_weight` is [K, d] as in
F.linear, `linear_bias` [K], `weight` the per-class loss weights, and the cross-entropy options mean what they
mean in `fastcls.ops.cross_entropy` (torch's semantics; a mean over no kept rows is 0).

The rows are processed in chunks: a chunk's logits are computed by one matrix product into a reused buffer, the
cross-entropy kernel (C++ on CPU, Triton on CUDA) writes the chunk's loss and overwrites its logits with their
gradient, and two more products give that chunk's grad_input rows and add its share of grad_weight into an fp32
accumulator. Extra memory is that buffer plus the fp32 accumulator, whatever N. For "mean" and "sum" all of
this happens in the forward and the backward only scales the gradients by the upstream one (nothing to do when
it is exactly 1, the usual case, checked without a host sync on CUDA). For "none", whose upstream gradient
differs per row, the forward computes the losses only and the backward recomputes each chunk.

Under autocast the products run in the autocast dtype, as F.linear's would; the gradients come back in the
dtypes of the tensors they belong to. The op is registered with `fastcls.ops.dispatch` as taking what the
cross-entropy kernels take, in the products' dtype; others (fp64) run the reference.
"""
import torch

from fastcls.ops import dispatch
from fastcls.ops.cross_entropy import (
    CONSUMED_GRADIENT,
    RowKernel,
    check_options,
    check_target,
    cross_entropy_reference,
    reciprocal,
    unit_scale,
)

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


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, reduction,
                backend, validate, chunk_size):
        dtype = _compute_dtype(input, linear_weight, *(() if linear_bias is None else (linear_bias,)))
        x = input.to(dtype).contiguous()
        w = linear_weight.to(dtype).contiguous()
        b = None if linear_bias is None else linear_bias.to(dtype)
        n_rows, n_classes = x.shape[0], w.shape[0]
        kernel = RowKernel(backend, n_classes, weight, ignore_index, label_smoothing, x.device)
        divisor = kernel.mean_divisor(target, validate)
        rows_per_chunk = chunk_rows(n_rows, n_classes, x.element_size(), x.device.type, chunk_size)
        chunked = _Chunked(kernel, x, w, b, target, rows_per_chunk)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], linear_bias is not None and ctx.needs_input_grad[3])
        ctx.dtypes = (input.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        ctx.backend, ctx.reduction = backend, reduction
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if reduction == "none":
            chunked.run(unit_scale(backend, x.device), None, (False, False, False), loss_rows)
            ctx.chunked, ctx.needs = chunked, needs
            return loss_rows
        scale = reciprocal(divisor) if reduction == "mean" else unit_scale(backend, x.device)
        ctx.grads = chunked.run(scale, None, needs, loss_rows)
        total = loss_rows.sum()
        return total / divisor if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            chunked = ctx.chunked
            grads = chunked.run(unit_scale(ctx.backend, grad_output.device), grad_output.float(), ctx.needs)
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(CONSUMED_GRADIENT)
            if ctx.backend == "triton" or grad_output.item() != 1.0:  # a CPU tensor on the cpp path: no sync
                grads = [None if g is None else g.mul_(grad_output) for g in grads]
        grad_x, grad_w, grad_b = (None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return grad_x, grad_w, None, grad_b, None, None, None, None, None, None, None


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
    (default: about 16 MiB of logits on the CPU, 256 MiB
    on CUDA, at least 64 rows)."""
    _check_inputs(input, linear_weight, target, linear_bias, weight, label_smoothing, reduction)
    dtype = _compute_dtype(input, linear_weight, *(() if linear_bias is None else (linear_bias,)))
    backend = dispatch.backend_for("linear_cross_entropy", input.device, dtype, backend=backend)
    if backend == "reference":
        return linear_cross_entropy_reference(input, linear_weight, target, linear_bias, weight, ignore_index,
                                              label_smoothing, reduction)
    target = target.to(torch.int64).contiguous()
    return _apply_kernels(input, linear_weight, target, linear_bias, weight, ignore_index, float(label_smoothing),
                          reduction, backend, validate, chunk_size)


# torch.compile runs the kernels eagerly (a graph break) instead of tracing into raw pointers and pybind calls.
@torch.compiler.disable
def _apply_kernels(*args):
    return _LinearCrossEntropyFunction.apply(*args)
