"""Typed calls into the C++ kernels (`fastcls._C_<variant>`, the one fastcls.ops.cpu_variant loads): the one place
that hands them tensor addresses (long because every kernel's call is checked here, and nowhere else).

The extension takes raw addresses (csrc/bindings.cpp), so a tensor of the wrong dtype, shape, layout or device
makes it read or write memory the tensor does not own. Each wrapper takes tensors (None for an absent one),
checks what the kernel assumes of them, and passes their addresses with torch's thread count. A wrapper takes
the arguments of its Triton twin in `fastcls.kernels` and allocates what that one allocates, so an op calls
either the same way. The dtype tables below are what the ops register as their cpp kernels' dtypes.
"""
import threading

import torch

from fastcls.ops import dispatch

_SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
CROSS_ENTROPY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DROPOUT_DTYPES = (torch.float32, torch.bfloat16)
BIAS_GELU_DTYPES = (torch.float32, torch.bfloat16)
# the Linear products' kernels (csrc/linear_bf16.h): bf16, in the avx512_bf16 variant alone; panels of 48 columns
LINEAR_DTYPES = (torch.bfloat16,)
LINEAR_PANEL = 48
LINEAR_BUILT = hasattr(dispatch.cpp_ext, "linear_bf16_gemm")
# the layer_norm kernels' dtype codes: the index in this tuple
LAYER_NORM_DTYPES = (torch.float32, torch.bfloat16)
# AdamW's entry points by dtype key: the parameter dtype, paired with "master" where fp32 master weights and
# moments back it; the gradients share the parameter's dtype
ADAMW_KERNELS = {torch.float32: "adamw_f32", (torch.bfloat16, "master"): "adamw_bf16_master"}
# the gradient sum of squares over the same tables, by the same keys
ADAMW_GRAD_SUM_OF_SQUARES_KERNELS = {torch.float32: "adamw_grad_sum_of_squares_f32",
                                     (torch.bfloat16, "master"): "adamw_grad_sum_of_squares_bf16"}
# the same steps and sums for tables with row masks (csrc/adamw.h), by the same keys
ADAMW_LIVE_ROWS_KERNELS = {torch.float32: "adamw_live_rows_f32",
                           (torch.bfloat16, "master"): "adamw_live_rows_bf16_master"}
ADAMW_LIVE_ROWS_GRAD_SUM_OF_SQUARES_KERNELS = {
    torch.float32: "adamw_live_rows_grad_sum_of_squares_f32",
    (torch.bfloat16, "master"): "adamw_live_rows_grad_sum_of_squares_bf16"}
ADAMW_TABLE_WIDTH = 8  # kAdamWTableWidth in csrc/adamw.h
# kAdamWLiveTableWidth: a tensor's row mask address (0: dense) and row width, then its deferred rows' columns
ADAMW_LIVE_TABLE_WIDTH = 8
ADAMW_HISTORY_WIDTH = 8  # kAdamWHistoryWidth: the fp32 record of one step, for deferred rows


def _check(tensor: torch.Tensor, name: str, dtypes, shape: tuple[int, ...] | None, *,
           contiguous: bool = True) -> None:
    # the passing case in one expression: it runs before every kernel call
    if tensor.is_cpu and tensor.dtype in dtypes and (shape is None or tensor.shape == shape) and (
            not contiguous or tensor.is_contiguous()):
        return
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the C++ kernels, got one on {tensor.device}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {[dispatch.dtype_name(d) for d in dtypes]}, got {tensor.dtype}")
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _fp32_vector(tensor: torch.Tensor, name: str, length: int) -> torch.Tensor:
    """tensor as the contiguous fp32 vector the kernels read; the caller keeps it alive through the call."""
    if tensor.dtype == torch.float32 and tensor.is_cpu and tensor.shape == (length,) and tensor.is_contiguous():
        return tensor  # as it is (the kernels read it through its address): a LayerNorm's own parameters
    if tensor.device.type != "cpu" or tuple(tensor.shape) != (length,):
        raise ValueError(f"{name} must be a CPU tensor of shape ({length},), got {tuple(tensor.shape)} on "
                         f"{tensor.device}")
    return tensor.detach().to(torch.float32).contiguous()


def cross_entropy_target_summary(target: torch.Tensor, n_classes: int, ignore_index: int,
                                 class_weight: torch.Tensor | None) -> tuple[float, int]:
    """(sum of class_weight[target] over kept rows (their count without weights), number of kept rows);
    IndexError on a target neither ignore_index nor in [0, n_classes)."""
    _check(target, "target", (torch.int64,), (target.numel(),))
    weight32 = None if class_weight is None else _fp32_vector(class_weight, "class_weight", n_classes)
    return dispatch.cpp_ext.cross_entropy_target_summary(
        target.data_ptr(), target.shape[0], n_classes, ignore_index, _address(weight32))


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None,
                       ignore_index: int, label_smoothing: float, grad: torch.Tensor | None,
                       grad_scale: float) -> torch.Tensor:
    """Per-row fp32 losses of logits [N, K] (class stride 1); unless `grad` is None, also writes grad_scale times
    the gradient into it (the logits' shape and dtype, class stride 1; may be `logits` itself)."""
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with class stride 1, got shape {tuple(logits.shape)} and strides "
                         f"{logits.stride()}")
    n_rows, n_classes = logits.shape
    _check(logits, "logits", CROSS_ENTROPY_DTYPES, None, contiguous=False)
    _check(target, "target", (torch.int64,), (n_rows,))
    if grad is not None:
        _check(grad, "grad", (logits.dtype,), (n_rows, n_classes), contiguous=False)
        if grad.stride(1) != 1:
            raise ValueError(f"grad must have class stride 1, got strides {grad.stride()}")
    weight32 = None if class_weight is None else _fp32_vector(class_weight, "class_weight", n_classes)
    loss_rows = torch.empty(n_rows, dtype=torch.float32)
    kernel = getattr(dispatch.cpp_ext, f"cross_entropy_rows_{_SUFFIXES[logits.dtype]}")
    kernel(logits.data_ptr(), n_rows, n_classes, logits.stride(0), target.data_ptr(), ignore_index,
           _address(weight32), label_smoothing, loss_rows.data_ptr(), _address(grad),
           0 if grad is None else grad.stride(0), float(grad_scale), torch.get_num_threads())
    return loss_rows


def multi_task_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor,
                             task_scale: torch.Tensor, ignore_index: int,
                             grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, task_loss_sums), fp32, of logits [N, sum K_t] (class stride 1) against targets [N, T], the tasks'
    class segments given by `segments` (int64 [2, T]: offsets, then sizes); unless `grad` is None, also writes the
    loss's gradient into it (the logits' shape and dtype, class stride 1). ValueError on segments that do not
    tile a row (checked by the kernel), IndexError on a target neither ignore_index nor in [0, K_t)."""
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with class stride 1, got shape {tuple(logits.shape)} and strides "
                         f"{logits.stride()}")
    _check(logits, "logits", CROSS_ENTROPY_DTYPES, None, contiguous=False)
    n_rows, n_tasks = targets.shape
    _check(targets, "targets", (torch.int64,), (logits.shape[0], n_tasks))
    _check(segments, "segments", (torch.int64,), (2, n_tasks))
    if grad is not None:
        _check(grad, "grad", (logits.dtype,), tuple(logits.shape), contiguous=False)
        if grad.stride(1) != 1:
            raise ValueError(f"grad must have class stride 1, got strides {grad.stride()}")
    scale32 = _fp32_vector(task_scale, "task_scale", n_tasks)
    task_loss_sums = torch.empty(n_tasks, dtype=torch.float32)
    loss = torch.empty((), dtype=torch.float32)
    kernel = getattr(dispatch.cpp_ext, f"multi_task_cross_entropy_{_SUFFIXES[logits.dtype]}")
    kernel(logits.data_ptr(), n_rows, logits.shape[1], logits.stride(0), targets.data_ptr(), n_tasks,
           segments.data_ptr(), ignore_index, scale32.data_ptr(), task_loss_sums.data_ptr(), loss.data_ptr(),
           _address(grad), 0 if grad is None else grad.stride(0), torch.get_num_threads())
    return loss, task_loss_sums


def dropout(x: torch.Tensor, seed: int, counter_offset: int, threshold: int, scale: float) -> torch.Tensor:
    """A new tensor: x's elements whose Philox word is >= threshold times scale, the others 0 (contiguous x;
    0 <= seed, counter_offset < 2^64, 0 <= threshold <= 2^32)."""
    _check(x, "x", DROPOUT_DTYPES, None)
    out = torch.empty_like(x)
    kernel = getattr(dispatch.cpp_ext, f"dropout_{_SUFFIXES[x.dtype]}")
    kernel(x.data_ptr(), out.data_ptr(), x.numel(), seed, counter_offset, threshold, scale, torch.get_num_threads())
    return out


# bias_gelu's `pairs` layouts (csrc/bias_gelu.h): what linear_interleave_row_pairs and linear_pack_pairs write
ROW_PAIRS, PAIR_PANELS = 1, 2


def pairs_empty(n_rows: int, n_cols: int, layout: int) -> torch.Tensor:
    """An uninitialized bf16 buffer for an [n_rows, n_cols] tensor in a weight gradient's layout: ROW_PAIRS
    (linear_interleave_row_pairs's) or PAIR_PANELS (linear_pack_pairs's, the last panel's columns past n_cols
    zeroed as there)."""
    pair_rows = -(-n_rows // 2)
    if layout == ROW_PAIRS:
        return torch.empty(pair_rows * 2 * n_cols, dtype=torch.bfloat16)
    packed = torch.empty(_panels(n_cols) * LINEAR_PANEL * 2 * pair_rows, dtype=torch.bfloat16)
    if n_cols % LINEAR_PANEL:
        packed.view(-1, pair_rows, LINEAR_PANEL, 2)[-1, :, n_cols % LINEAR_PANEL:].zero_()
    return packed


def _pairs_args(pairs: torch.Tensor | None, layout: int, n_rows: int, n_cols: int) -> tuple[int, int]:
    if pairs is None:
        return 0, 0
    if layout not in (ROW_PAIRS, PAIR_PANELS):
        raise ValueError(f"pairs_layout must be ROW_PAIRS or PAIR_PANELS, got {layout}")
    _check(pairs, "pairs", (torch.bfloat16,), None)
    expected = -(-n_rows // 2) * 2 * (n_cols if layout == ROW_PAIRS else _panels(n_cols) * LINEAR_PANEL)
    if pairs.numel() != expected:
        raise ValueError(f"pairs holds {pairs.numel()} elements, not the {expected} of its layout")
    return pairs.data_ptr(), layout


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor | None, pairs: torch.Tensor | None = None,
                      pairs_layout: int = 0) -> torch.Tensor:
    """A new tensor gelu(x + bias) from contiguous x [N, H] and bias [H] (any float dtype) or None; with pairs (from
    pairs_empty), the output in bf16 goes there too in pairs_layout."""
    n_rows, n_cols = x.shape
    _check(x, "x", BIAS_GELU_DTYPES, (n_rows, n_cols))
    bias32 = None if bias is None else _fp32_vector(bias, "bias", n_cols)
    out = torch.empty_like(x)
    kernel = getattr(dispatch.cpp_ext, f"bias_gelu_forward_{_SUFFIXES[x.dtype]}")
    kernel(x.data_ptr(), _address(bias32), out.data_ptr(), *_pairs_args(pairs, pairs_layout, n_rows, n_cols), n_rows,
           n_cols, torch.get_num_threads())
    return out


def bias_gelu_backward(grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                       pairs: torch.Tensor | None = None, pairs_layout: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [N, H] in x's dtype, the fp32 column sums of grad_x [H]) of bias_gelu_forward; contiguous tensors.
    With pairs (from pairs_empty), grad_x in bf16 goes there too in pairs_layout."""
    n_rows, n_cols = x.shape
    _check(x, "x", BIAS_GELU_DTYPES, (n_rows, n_cols))
    _check(grad_out, "grad_out", (x.dtype,), (n_rows, n_cols))
    bias32 = None if bias is None else _fp32_vector(bias, "bias", n_cols)
    grad_x = torch.empty_like(x)
    grad_bias = torch.empty(n_cols, dtype=torch.float32)
    kernel = getattr(dispatch.cpp_ext, f"bias_gelu_backward_{_SUFFIXES[x.dtype]}")
    kernel(grad_out.data_ptr(), x.data_ptr(), _address(bias32), grad_x.data_ptr(), grad_bias.data_ptr(),
           *_pairs_args(pairs, pairs_layout, n_rows, n_cols), n_rows, n_cols, torch.get_num_threads())
    return grad_x, grad_bias


def _linear_sources(weights) -> list[torch.Tensor]:
    """The weights as contiguous 2-D bf16 or fp32 tensors of one width and even row counts (others cast to fp32)."""
    out = []
    for w in weights:
        if not w.is_cpu or w.dim() != 2 or w.shape[1] != weights[0].shape[1] or w.shape[0] % 2:
            raise ValueError(f"weights must be CPU [N_i, K] tensors of one K and even N_i, got {tuple(w.shape)}")
        # as they are where they already are (the kernels read them through their addresses): every step's case
        out.append(w if w.dtype in _LINEAR_SOURCES and w.is_contiguous() else w.detach().to(
            w.dtype if w.dtype in _LINEAR_SOURCES else torch.float32).contiguous())
    return out


_LINEAR_SOURCES = (torch.bfloat16, torch.float32)


def _panels(columns: int) -> int:
    return -(-columns // LINEAR_PANEL)


def linear_pack_wt(weights, with_pairs: bool = False,
                   pending: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights stacked on their rows, [N, K], packed as the forward's B = W^T and, with_pairs, as the input
    gradient's B = W (what linear_pack_pairs returns) in the same pass (csrc/linear_bf16.h). With `pending` (a
    list), the packs are allocated and the kernel calls that fill them appended there, for run_pending."""
    sources = _linear_sources(weights)
    n_rows, width = sum(w.shape[0] for w in sources), sources[0].shape[1]
    if width % 2:
        raise ValueError(f"the weights' width must be even, got {width}")
    packed = torch.empty(_panels(n_rows) * LINEAR_PANEL * width, dtype=torch.bfloat16)
    pairs = torch.empty(_panels(width) * LINEAR_PANEL * n_rows, dtype=torch.bfloat16) if with_pairs else None
    offset, calls = 0, []
    for w in sources:
        kernel = getattr(dispatch.cpp_ext, f"linear_pack_wt_{_SUFFIXES[w.dtype]}")
        # the call holds the tensors whose addresses it carries
        calls.append((kernel, (w.data_ptr(), w.shape[0], offset, width, packed.data_ptr(), _address(pairs), n_rows,
                               torch.get_num_threads()), (w, packed, pairs)))
        offset += w.shape[0]
    if pending is None:
        run_pending(calls)
    else:
        pending.extend(calls)
    if n_rows % LINEAR_PANEL:  # the last panel's rows past N: computed, never stored; zeros all the same
        packed.view(-1, width // 2, LINEAR_PANEL, 2)[-1, :, n_rows % LINEAR_PANEL:].zero_()
    if pairs is not None and width % LINEAR_PANEL:
        pairs.view(-1, n_rows // 2, LINEAR_PANEL, 2)[-1, :, width % LINEAR_PANEL:].zero_()
    return packed, pairs


def run_pending(calls: list) -> None:
    """The kernel calls that linear_pack_wt left in `pending`, in order."""
    for kernel, args, _ in calls:
        kernel(*args)


def _pack_pairs(sources, n_rows: int, width: int) -> torch.Tensor:
    pair_rows = -(-n_rows // 2)
    packed = torch.empty(_panels(width) * LINEAR_PANEL * 2 * pair_rows, dtype=torch.bfloat16)
    offset = 0
    for b in sources:
        kernel = getattr(dispatch.cpp_ext, f"linear_pack_pairs_{_SUFFIXES[b.dtype]}")
        kernel(b.data_ptr(), width, b.shape[0], offset, n_rows, width, packed.data_ptr(), torch.get_num_threads())
        offset += b.shape[0]
    if width % LINEAR_PANEL:
        packed.view(-1, pair_rows, LINEAR_PANEL, 2)[-1, :, width % LINEAR_PANEL:].zero_()
    return packed


def linear_pack_pairs(weights) -> torch.Tensor:
    """The weights stacked on their rows, [N, K], packed as the input gradient's B = W (csrc/linear_bf16.h)."""
    sources = _linear_sources(weights)
    return _pack_pairs(sources, sum(w.shape[0] for w in sources), sources[0].shape[1])


def linear_gemm(a: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n_cols: int,
                add_to: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] (bf16, contiguous, K even) times the packed B [K, n_cols], plus an fp32 bias [n_cols] or None:
    a new bf16 [M, n_cols]; with add_to (fp32 [M, n_cols], contiguous), that product is added to add_to instead,
    which is returned (the bits of add_to.add_(product))."""
    n_rows, width = a.shape
    _check(a, "a", LINEAR_DTYPES, (n_rows, width))
    if width % 2 or packed.numel() != _panels(n_cols) * LINEAR_PANEL * width:
        raise ValueError(f"packed holds {packed.numel()} elements, not a [{width}, {n_cols}] B (even width)")
    if bias is not None:
        _check(bias, "bias", (torch.float32,), (n_cols,))
    if add_to is not None:
        _check(add_to, "add_to", (torch.float32,), (n_rows, n_cols))
    out = torch.empty(n_rows, n_cols, dtype=torch.bfloat16) if add_to is None else None
    dispatch.cpp_ext.linear_bf16_gemm(a.data_ptr(), width // 2, 1, packed.data_ptr(), _address(bias), _address(out),
                                      _address(add_to), add_to is not None, n_cols, n_rows, n_cols, width,
                                      torch.get_num_threads())
    return out if add_to is None else add_to


def linear_weight_grad(grad_y: torch.Tensor, x: torch.Tensor, with_bias: bool = False,
                       grad_y_pairs: torch.Tensor | None = None,
                       x_pairs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_y^T x [N, K] bf16, and with_bias grad_y's fp32 column sums [N]) from contiguous bf16 grad_y [M, N] and
    x [M, K] (any M; pairs of rows padded). grad_y_pairs (without with_bias) and x_pairs: those tensors already in
    the product's layouts (ROW_PAIRS and PAIR_PANELS, as bias_gelu writes them), for which grad_y or x stands only
    for its shape."""
    n_rows, n_out = grad_y.shape
    width = x.shape[1]
    _check(grad_y, "grad_y", LINEAR_DTYPES, (n_rows, n_out), contiguous=grad_y_pairs is None)
    _check(x, "x", LINEAR_DTYPES, (n_rows, width), contiguous=x_pairs is None)
    pair_rows = -(-n_rows // 2)
    interleaved, col_sums = grad_y_pairs, None
    if grad_y_pairs is None:
        interleaved = torch.empty(pair_rows * 2 * n_out, dtype=torch.bfloat16)
        col_sums = torch.empty(n_out, dtype=torch.float32) if with_bias else None
        dispatch.cpp_ext.linear_interleave_row_pairs(grad_y.data_ptr(), n_out, n_rows, n_out, interleaved.data_ptr(),
                                                     _address(col_sums), torch.get_num_threads())
    elif with_bias or interleaved.numel() != pair_rows * 2 * n_out:
        raise ValueError("grad_y_pairs must hold grad_y's row pairs, and comes without with_bias")
    packed = _pack_pairs([x], n_rows, width) if x_pairs is None else x_pairs
    if packed.numel() != _panels(width) * LINEAR_PANEL * 2 * pair_rows:
        raise ValueError(f"x_pairs holds {packed.numel()} elements, not x's pair-packed panels")
    out = torch.empty(n_out, width, dtype=torch.bfloat16)
    dispatch.cpp_ext.linear_bf16_gemm(interleaved.data_ptr(), 1, n_out, packed.data_ptr(), 0, out.data_ptr(), 0,
                                      False, width, n_out, width, 2 * pair_rows, torch.get_num_threads())
    return out, col_sums


def layer_norm_forward(x, residual, weight, bias, out, summed, mean, rstd, eps, seed, counter_offset, threshold,
                       scale, dropout_after, out_bf16=None) -> None:
    """Fill out [N, H] (and summed, unless None, and the per-row fp32 mean and rstd) from contiguous x [N, H] and
    residual (or None); out and summed share one dtype. out_bf16 (a bf16 [N, H], or None) receives out rounded to
    bf16, as out.to(torch.bfloat16) would be (csrc/layer_norm.h: but for fp32 subnormals)."""
    n_rows, n_cols = x.shape
    _check(x, "x", LAYER_NORM_DTYPES, (n_rows, n_cols))
    if residual is not None:
        _check(residual, "residual", LAYER_NORM_DTYPES, (n_rows, n_cols))
    _check(out, "out", LAYER_NORM_DTYPES, (n_rows, n_cols))
    if summed is not None:
        _check(summed, "summed", (out.dtype,), (n_rows, n_cols))
    if out_bf16 is not None:
        _check(out_bf16, "out_bf16", (torch.bfloat16,), (n_rows, n_cols))
    for name, tensor in (("mean", mean), ("rstd", rstd)):
        _check(tensor, name, (torch.float32,), (n_rows,))
    weight32, bias32 = _fp32_vector(weight, "weight", n_cols), _fp32_vector(bias, "bias", n_cols)
    dispatch.cpp_ext.layer_norm_forward(
        x.data_ptr(), _dtype_code(x), _address(residual), _dtype_code(residual), weight32.data_ptr(),
        bias32.data_ptr(), out.data_ptr(), _address(summed), _dtype_code(out), _address(out_bf16), mean.data_ptr(),
        rstd.data_ptr(), n_rows, n_cols, eps, seed, counter_offset, threshold, scale, dropout_after,
        torch.get_num_threads())


def layer_norm_backward(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, grad_x,
                        grad_residual, seed, counter_offset, threshold, scale, dropout_after) -> torch.Tensor:
    """Fill grad_x (and grad_residual, unless None) from grad_out and grad_sum (or None) in saved's dtype; returns
    the [2, threads, H] fp32 partial weight and bias gradients."""
    n_rows, n_cols = saved.shape
    _check(saved, "saved", LAYER_NORM_DTYPES, (n_rows, n_cols))
    _check(grad_out, "grad_out", (saved.dtype,), (n_rows, n_cols))
    if grad_sum is not None:
        _check(grad_sum, "grad_sum", (saved.dtype,), (n_rows, n_cols))
    _check(grad_x, "grad_x", LAYER_NORM_DTYPES, (n_rows, n_cols))
    if grad_residual is not None:
        _check(grad_residual, "grad_residual", LAYER_NORM_DTYPES, (n_rows, n_cols))
    for name, tensor in (("mean", mean), ("rstd", rstd)):
        _check(tensor, name, (torch.float32,), (n_rows,))
    weight32, bias32 = _fp32_vector(weight, "weight", n_cols), _fp32_vector(bias, "bias", n_cols)
    n_threads = torch.get_num_threads()
    partials = torch.empty((2, n_threads, n_cols), dtype=torch.float32)
    dispatch.cpp_ext.layer_norm_backward(
        grad_out.data_ptr(), saved.data_ptr(), _dtype_code(saved), saved_is_output, weight32.data_ptr(),
        bias32.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _address(grad_sum), grad_x.data_ptr(),
        _dtype_code(grad_x), _address(grad_residual), _dtype_code(grad_residual), partials.data_ptr(),
        partials.data_ptr() + n_threads * n_cols * 4, n_rows, n_cols, seed, counter_offset, threshold, scale,
        dropout_after, n_threads)
    return partials


def _dtype_code(tensor: torch.Tensor | None) -> int:
    """The layer_norm kernels' code for the tensor's dtype; 0 for an absent tensor."""
    return 0 if tensor is None else LAYER_NORM_DTYPES.index(tensor.dtype)


def layer_norm_output_recovers(weight: torch.Tensor, bias: torch.Tensor, max_bias_over_weight: float) -> bool:
    """Whether every column of contiguous CPU vectors weight and bias (one dtype of LAYER_NORM_DTYPES) has
    weight != 0, |bias| <= max_bias_over_weight * |weight| in fp32 and a finite weight."""
    _check(weight, "weight", LAYER_NORM_DTYPES, (weight.numel(),))
    _check(bias, "bias", (weight.dtype,), (weight.numel(),))
    return dispatch.cpp_ext.layer_norm_output_recovers(weight.data_ptr(), bias.data_ptr(), _dtype_code(weight),
                                                       weight.numel(), max_bias_over_weight)


def adamw(table: torch.Tensor, dtype_key, *, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
          weight_decay: float, amsgrad: bool, maximize: bool, bias_correction: bool,
          grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
          clip_coef: torch.Tensor | None = None, live_table: torch.Tensor | None = None) -> None:
    """One AdamW step over the tensors whose addresses `table` holds (int64, a row per tensor laid out as
    `fastcls.optim.adamw_table.TABLE_COLUMNS`), with the entry point of `dtype_key` (a key of ADAMW_KERNELS).
    lr: a float, or a one-element fp32/fp64 CPU tensor that the kernel reads itself (Python never reads it);
    grad_scale, found_inf and clip_coef (multiplies the unscaled gradients, which are not rewritten): None or
    one-element fp32 CPU tensors. live_table (int64, ADAMW_LIVE_TABLE_WIDTH columns, a row per table row): the
    row masks of tensors most of whose rows no step has touched (csrc/adamw.h; fastcls.optim.row_sparse)."""
    _check(table, "table", (torch.int64,), (table.shape[0], ADAMW_TABLE_WIDTH))
    if live_table is not None:
        _check(live_table, "live_table", (torch.int64,), (table.shape[0], ADAMW_LIVE_TABLE_WIDTH))
    _check_scalars(grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)
    lr32 = None
    if isinstance(lr, torch.Tensor):
        _check(lr, "lr", (torch.float32, torch.float64), None)
        if lr.numel() != 1:
            raise ValueError(f"lr must have one element, got shape {tuple(lr.shape)}")
        lr32 = lr.detach().reshape(()).to(torch.float32)  # itself when already fp32
    options = (0.0 if lr32 is not None else lr, _address(lr32), beta1, beta2, eps, weight_decay, amsgrad, maximize,
               bias_correction, _address(grad_scale), _address(found_inf), _address(clip_coef), torch.get_num_threads())
    if live_table is None:
        getattr(dispatch.cpp_ext, ADAMW_KERNELS[dtype_key])(table.data_ptr(), table.shape[0], *options)
    else:
        getattr(dispatch.cpp_ext, ADAMW_LIVE_ROWS_KERNELS[dtype_key])(
            table.data_ptr(), live_table.data_ptr(), table.shape[0], *options)


ADAMW_CATCH_UP_KERNELS = {torch.float32: "adamw_catch_up_rows_f32",
                          (torch.bfloat16, "master"): "adamw_catch_up_rows_bf16_master"}


def adamw_catch_up_rows(dtype_key, table_row: torch.Tensor, live_row: torch.Tensor, write_param: bool = True) -> bool:
    """Bring a deferred tensor's rows up to date (csrc/adamw.h): its table row (int64, ADAMW_TABLE_WIDTH) and live
    row (int64, ADAMW_LIVE_TABLE_WIDTH, the ids or every row); without write_param, all but the parameter. False,
    nothing done, where an id is outside the table."""
    _check(table_row, "table_row", (torch.int64,), (ADAMW_TABLE_WIDTH,))
    _check(live_row, "live_row", (torch.int64,), (ADAMW_LIVE_TABLE_WIDTH,))
    kernel = getattr(dispatch.cpp_ext, ADAMW_CATCH_UP_KERNELS[dtype_key])
    return kernel(table_row.data_ptr(), live_row.data_ptr(), write_param, torch.get_num_threads()) == 0


def _check_scalars(**tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None:
            _check(tensor, name, (torch.float32,), None)
            if tensor.numel() != 1:
                raise ValueError(f"{name} must have one element, got shape {tuple(tensor.shape)}")


def adamw_grad_sum_of_squares(table: torch.Tensor, dtype_key, grad_scale: torch.Tensor | None,
                              live_table: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of the squares of the gradients in `table` (laid out as for `adamw`), each divided by grad_scale
    (None or a one-element fp32 CPU tensor) first, as a 0-dim fp64 CPU tensor (summed in fp64: adamw.h); with
    `live_table` (as for `adamw`), read from the live rows of masked tensors only, to the same bits."""
    _check(table, "table", (torch.int64,), (table.shape[0], ADAMW_TABLE_WIDTH))
    _check_scalars(grad_scale=grad_scale)
    out = torch.empty((), dtype=torch.float64)
    if live_table is None:
        getattr(dispatch.cpp_ext, ADAMW_GRAD_SUM_OF_SQUARES_KERNELS[dtype_key])(
            table.data_ptr(), table.shape[0], _address(grad_scale), out.data_ptr(), torch.get_num_threads())
    else:
        _check(live_table, "live_table", (torch.int64,), (table.shape[0], ADAMW_LIVE_TABLE_WIDTH))
        getattr(dispatch.cpp_ext, ADAMW_LIVE_ROWS_GRAD_SUM_OF_SQUARES_KERNELS[dtype_key])(
            table.data_ptr(), live_table.data_ptr(), table.shape[0], _address(grad_scale), out.data_ptr(),
            torch.get_num_threads())
    return out


VARLEN_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)  # dtype code: the index in this tuple
VARLEN_ATTENTION_MAX_HEAD_DIM = 128  # kMaxHeadDim in csrc/varlen_attention.cpp


def _check_heads(tensor: torch.Tensor, name: str, dtype: torch.dtype, heads: int, head_dim: int) -> None:
    """tensor [T, heads, head_dim] on the CPU with element stride 1 (any token and head strides)."""
    _check(tensor, name, (dtype,), (tensor.shape[0], heads, head_dim), contiguous=False)
    if tensor.stride(2) != 1:
        raise ValueError(f"{name} must have element stride 1, got strides {tensor.stride()}")


def _varlen_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k):
    heads, head_dim = q.shape[1:]
    if head_dim > VARLEN_ATTENTION_MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} exceeds the kernel's maximum {VARLEN_ATTENTION_MAX_HEAD_DIM}")
    _check(q, "q", VARLEN_ATTENTION_DTYPES, None, contiguous=False)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_heads(tensor, name, q.dtype, heads, head_dim)
    rows = cu_seqlens_q.numel() - 1
    _check(cu_seqlens_q, "cu_seqlens_q", (torch.int64,), (rows + 1,))
    _check(cu_seqlens_k, "cu_seqlens_k", (torch.int64,), (rows + 1,))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    return (q.data_ptr(), k.data_ptr(), v.data_ptr(), VARLEN_ATTENTION_DTYPES.index(q.dtype), strides,
            cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(), rows, heads, head_dim)


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, seed, counter_offset, threshold,
                             drop_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Tq, H, D] contiguous in q's dtype, fp32 log-sum-exp [Tq, H]) of q [Tq, H, D], k and v [Tk, H, D]
    (element stride 1), rows given by int64 cu_seqlens_q and cu_seqlens_k whose values lie within the tensors
    (the caller checks them)."""
    args = _varlen_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k)
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    dispatch.cpp_ext.varlen_attention_forward(*args, scale, seed, counter_offset, threshold, drop_scale,
                                              out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    return out, lse


def varlen_attention_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, seed, counter_offset, threshold,
                              drop_scale, grad_out, lse, stacked: bool = False):
    """(grad_q, grad_k, grad_v), contiguous, from contiguous grad_out [Tq, H, D] (q's dtype) and the forward's lse;
    stacked (q, k and v of one token count): one contiguous [T, 3, H, D] tensor of the three instead."""
    args = _varlen_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k)
    _check(grad_out, "grad_out", (q.dtype,), tuple(q.shape))
    _check(lse, "lse", (torch.float32,), tuple(q.shape[:2]))
    if stacked:
        if not q.shape == k.shape == v.shape:
            raise ValueError(f"stacked gradients need q, k and v of one shape, got {q.shape}, {k.shape}, {v.shape}")
        out = torch.empty((q.shape[0], 3, *q.shape[1:]), dtype=q.dtype)
        step = q.shape[1] * q.shape[2] * q.element_size()  # from q's gradient to k's, k's to v's, in a token
        addresses, token_stride = [out.data_ptr() + i * step for i in range(3)], out.stride(0)
    else:
        grads, token_stride = [torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v)], 0
        addresses = [g.data_ptr() for g in grads]
    dispatch.cpp_ext.varlen_attention_backward(*args, scale, seed, counter_offset, threshold, drop_scale,
                                               grad_out.data_ptr(), lse.data_ptr(), *addresses, token_stride,
                                               torch.get_num_threads())
    return out if stacked else tuple(grads)



ENCODER_LAYER_BUILT = hasattr(dispatch.cpp_ext, "encoder_layer_backward")
# each thread's scratch for the encoder layer's calls, grown to the largest batch's and kept: a fresh block of
# another size every call (token counts change batch to batch) fragmented the heap that keep_freed_host_memory keeps
_scratch = threading.local()


def encoder_layer_scratch(nbytes: int) -> torch.Tensor:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _scratch.buffer = torch.empty(nbytes, dtype=torch.uint8)
        if buffer.data_ptr() % 64:
            raise ValueError("the encoder layer's scratch must start 64-byte aligned")
    return buffer
_SMALL_DTYPES = (torch.float32, torch.bfloat16)  # csrc/encoder_layer.h's bias_dtype and norm_dtype codes


def _checked(call: str, expected) -> None:
    """Each (tensor, dtype, numel) a CPU tensor of that dtype and element count, contiguous."""
    for tensor, dtype, numel in expected:
        if not (tensor.dtype == dtype and tensor.is_cpu and tensor.numel() == numel and tensor.is_contiguous()):
            raise ValueError(f"{call}: a contiguous {dispatch.dtype_name(dtype)} CPU tensor of {numel} elements "
                             f"expected, got {tensor.dtype} of {tensor.numel()} on {tensor.device}")


def _checked_cls_index(call: str, cls_index: torch.Tensor | None, rows: int, tokens: int) -> None:
    """cls_index (or None): int64 [rows] within the tokens, since the kernel reads rows at these indices."""
    if cls_index is None:
        return
    _checked(call, ((cls_index, torch.int64, rows),))
    low, high = cls_index.aminmax() if rows else (0, 0)
    if rows and (int(low) < 0 or int(high) >= tokens):
        raise ValueError(f"{call}: cls_index must lie in [0, {tokens}), got [{int(low)}, {int(high)}]")


def _packs_expected(packed: tuple, width: int, ffn: int, cls_only: bool, forward: bool) -> list:
    """(pack, dtype, numel) of the layer's packed weights: the forward's (linear_pack_wt) or the input gradients'
    (linear_pack_pairs) of the stacked product (with cls_only: the query's, then the keys' and values'), the
    attention output's and the feed-forward products' ([N, K] weights)."""
    shapes = [(width, width), (2 * width, width)] if cls_only else [(3 * width, width)]
    shapes += [(width, width), (ffn, width), (width, ffn)]
    if len(packed) != len(shapes):
        raise ValueError(f"{len(shapes)} packed weights expected, got {len(packed)}")
    return [(p, torch.bfloat16, (_panels(n) * LINEAR_PANEL * k if forward else _panels(k) * LINEAR_PANEL * n))
            for p, (n, k) in zip(packed, shapes)]


def _pack_fields(packed: tuple, cls_only: bool) -> list[int]:
    """The packs' addresses as the calls take them: the stacked product's (the query's), the keys' and values' (0
    without cls_index), then the rest."""
    return [packed[0].data_ptr(), packed[1].data_ptr() if cls_only else 0,
            *(p.data_ptr() for p in packed[2 if cls_only else 1:])]


def encoder_layer_backward(grad_h2: torch.Tensor, saved: dict, packed: tuple, ffn_in_bias: torch.Tensor,
                           norms: tuple, heads: int, attn_scale: float, dropouts: tuple, run: bool = True,
                           workspace: torch.Tensor | None = None) -> tuple:
    """The encoder layer's backward in one call (csrc/encoder_layer.h) for an fp32 residual stream: (grad_h fp32
    [T, d]; the bf16 weight gradients of the query, key and value products [3d, d], the attention output [d, d] and
    the feed-forward products [F, d] and [d, F]; the biases' gradients in ffn_in_bias's dtype, one after the other:
    the query's, key's and value's [3d], the attention output's and the feed-forward biases' [d], [F], [d]; the
    LayerNorms' in theirs: LN1's weight and bias, LN2's, [d] each).

    saved: the forward's bf16 hb [T, d] and qkv [T, 3d], or with cls_index (int64 [rows], or None) kv [T, 2d] and q
    and query_in [Q, d]; bf16 context, h1b [Q, d], f [Q, F] and g_pairs (PAIR_PANELS); fp32 lse [Q, heads], saved1,
    saved2 [Q, d] and mean1, rstd1, mean2, rstd2 [Q]; int64 cu [rows + 1]; the booleans saved1_is_output and
    saved2_is_output (Q: T, or the rows with cls_index). packed: the input gradients' packed weights
    (linear_pack_pairs) of the stacked product (with cls_index: the query's, then the keys' and values'), the
    attention output's and the feed-forward products'. ffn_in_bias: the GELU's bias [F]; norms: the LayerNorms'
    weights and biases [d] (LN1's, then LN2's) of one dtype; fp32 or bf16 each. dropouts: (seed, counter_offset,
    threshold, scale) of the attention's, LN1's and LN2's dropouts.

    With run=False the kernel is not called: (the outputs as above, the call's arguments for run_encoder_layer), so
    that a stack of layers allocates and checks everything before its kernels run; workspace: the scratch to hand
    the call (encoder_layer_workspace's size at least), else the thread's own."""
    hb, f, cls_index = saved["hb"], saved["f"], saved["cls_index"]
    tokens, width = hb.shape
    ffn = f.shape[1]
    rows = saved["cu"].numel() - 1
    cls_only = cls_index is not None
    queries = rows if cls_only else tokens
    pair_rows = -(-queries // 2)
    bf16, fp32, bias_dtype, norm_dtype = torch.bfloat16, torch.float32, ffn_in_bias.dtype, norms[0].dtype
    q_in = (((saved["q"], bf16, queries * width), (saved["query_in"], bf16, queries * width)) if cls_only else ())
    _checked("encoder_layer_backward", (
        (grad_h2, fp32, queries * width), (hb, bf16, tokens * width),
        (saved["qkv"], bf16, tokens * (2 if cls_only else 3) * width), *q_in,
        (saved["context"], bf16, queries * width), (saved["h1b"], bf16, queries * width), (f, bf16, queries * ffn),
        (saved["g_pairs"], bf16, _panels(ffn) * LINEAR_PANEL * 2 * pair_rows), (saved["lse"], fp32, queries * heads),
        (saved["saved1"], fp32, queries * width), (saved["saved2"], fp32, queries * width),
        (saved["cu"], torch.int64, rows + 1),
        *((saved[name], fp32, queries) for name in ("mean1", "rstd1", "mean2", "rstd2")),
        *_packs_expected(packed, width, ffn, cls_only, forward=False),
        (ffn_in_bias, bias_dtype, ffn), *((t, norm_dtype, width) for t in norms)))
    _checked_cls_index("encoder_layer_backward", cls_index, rows, tokens)
    if bias_dtype not in _SMALL_DTYPES or norm_dtype not in _SMALL_DTYPES or width % heads:
        raise ValueError(f"encoder_layer_backward: fp32 or bf16 biases and norms and whole heads, got {bias_dtype}, "
                         f"{norm_dtype} and {heads} heads of width {width}")
    grad_h = torch.empty(tokens, width, dtype=fp32)
    grads = [torch.empty(n, k, dtype=bf16) for n, k in ((3 * width, width), (width, width), (ffn, width), (width, ffn))]
    bias_grads = torch.empty(5 * width + ffn, dtype=bias_dtype)
    norm_grads = torch.empty(4 * width, dtype=norm_dtype)
    threads = torch.get_num_threads()
    if workspace is None:
        workspace = encoder_layer_scratch(encoder_layer_workspace("backward", tokens, rows, width, ffn, cls_only))
    fields = [tokens, width, ffn, rows, heads, hb.data_ptr(), saved["qkv"].data_ptr(),
              *(saved[name].data_ptr() if cls_only else 0 for name in ("q", "query_in")),
              *(saved[name].data_ptr() for name in ("context", "h1b", "f", "g_pairs", "lse", "saved1", "mean1", "rstd1",
                                                    "saved2", "mean2", "rstd2", "cu")), _address(cls_index),
              int(saved["saved1_is_output"]), int(saved["saved2_is_output"]), *_pack_fields(packed, cls_only),
              ffn_in_bias.data_ptr(), *(t.data_ptr() for t in norms), _SMALL_DTYPES.index(bias_dtype),
              _SMALL_DTYPES.index(norm_dtype), grad_h2.data_ptr(), grad_h.data_ptr(), *(g.data_ptr() for g in grads),
              bias_grads.data_ptr(), norm_grads.data_ptr(), workspace.data_ptr(), workspace.numel()]
    words = [int(word) for seed, offset, threshold, _ in dropouts for word in (seed, offset, threshold)]
    outputs = grad_h, grads, bias_grads, norm_grads
    # the call holds every tensor whose address it carries, so that they outlive it
    call = ("backward", (fields, words, [attn_scale, *(d[3] for d in dropouts)], threads),
            (grad_h2, saved, packed, ffn_in_bias, norms, outputs, workspace))
    if not run:
        return outputs, call
    run_encoder_layer(call)
    return outputs


def encoder_layer_workspace(direction: str, tokens: int, rows: int, width: int, ffn: int, cls_only: bool) -> int:
    """The scratch bytes of a layer's forward or backward call."""
    if direction == "forward":
        return dispatch.cpp_ext.encoder_layer_forward_workspace(tokens, rows, width, ffn, cls_only)
    return dispatch.cpp_ext.encoder_layer_backward_workspace(tokens, rows, width, ffn, cls_only,
                                                            torch.get_num_threads())


def run_encoder_layer(call: tuple) -> None:
    """The kernel of a call that encoder_layer_forward or _backward returned with run=False (direction, arguments,
    and the tensors at the addresses they carry, held until the call is dropped)."""
    direction, args, _ = call
    getattr(dispatch.cpp_ext, f"encoder_layer_{direction}")(*args)


def encoder_layer_forward(h: torch.Tensor, hb: torch.Tensor, cu: torch.Tensor, cls_index: torch.Tensor | None,
                          packed: tuple, biases: tuple, norms: tuple, heads: int, attn_scale: float, eps: tuple,
                          dropouts: tuple, keep_sums: tuple, run: bool = True,
                          workspace: torch.Tensor | None = None) -> tuple:
    """The encoder layer's forward in one call (csrc/encoder_layer.h) for an fp32 residual stream h [T, d] (hb: its
    bf16 copy; int64 cu [rows + 1]; cls_index, int64 [rows], or None): (qkv [T, 3d] (with cls_index kv [T, 2d]),
    q, query_in (with cls_index: [rows, d], else None), context [Q, d], lse [Q, heads], h1, sum1, mean1, rstd1,
    h1b, f [Q, F], g_pairs (PAIR_PANELS), h2, sum2, mean2, rstd2, h2b (None with cls_index)), sum1 and sum2 None
    unless keep_sums says so; Q: T, or the rows with cls_index.

    packed: the forward's packed weights (linear_pack_wt) of the stacked product (with cls_index: the query's, then
    the keys' and values'), the attention output's and the feed-forward products'. biases: the query's, key's,
    value's, attention output's, feed-forward in's and out's, of one dtype; norms: LN1's weight and bias, LN2's, of
    one dtype (fp32 or bf16 each). eps: the LayerNorms'; dropouts: (seed, counter_offset, threshold, scale) of the
    attention's, LN1's and LN2's dropouts. run and workspace: as encoder_layer_backward's."""
    tokens, width = h.shape
    ffn = biases[4].shape[0]
    rows = cu.numel() - 1
    cls_only = cls_index is not None
    queries = rows if cls_only else tokens
    bf16, fp32, bias_dtype, norm_dtype = torch.bfloat16, torch.float32, biases[0].dtype, norms[0].dtype
    _checked("encoder_layer_forward", (
        (h, fp32, tokens * width), (hb, bf16, tokens * width), (cu, torch.int64, rows + 1),
        *_packs_expected(packed, width, ffn, cls_only, forward=True),
        *((b, bias_dtype, n) for b, n in zip(biases, (width, width, width, width, ffn, width))),
        *((t, norm_dtype, width) for t in norms)))
    _checked_cls_index("encoder_layer_forward", cls_index, rows, tokens)
    if bias_dtype not in _SMALL_DTYPES or norm_dtype not in _SMALL_DTYPES or width % heads or width % 2:
        raise ValueError(f"encoder_layer_forward: fp32 or bf16 biases and norms, whole heads and an even width, got "
                         f"{bias_dtype}, {norm_dtype} and {heads} heads of width {width}")
    qkv = torch.empty(tokens, (2 if cls_only else 3) * width, dtype=bf16)
    q, query_in = (torch.empty(queries, width, dtype=bf16) for _ in range(2)) if cls_only else (None, None)
    context, h1b = torch.empty(queries, width, dtype=bf16), torch.empty(queries, width, dtype=bf16)
    h2b = None if cls_only else torch.empty(queries, width, dtype=bf16)
    f = torch.empty(queries, ffn, dtype=bf16)
    g_pairs = pairs_empty(queries, ffn, PAIR_PANELS)
    lse = torch.empty(queries, heads, dtype=fp32)
    h1, h2 = torch.empty(queries, width, dtype=fp32), torch.empty(queries, width, dtype=fp32)
    sum1, sum2 = (torch.empty(queries, width, dtype=fp32) if keep else None for keep in keep_sums)
    mean1, rstd1, mean2, rstd2 = torch.empty(4, queries, dtype=fp32).unbind()
    if workspace is None:
        workspace = encoder_layer_scratch(encoder_layer_workspace("forward", tokens, rows, width, ffn, cls_only))
    fields = [tokens, width, ffn, rows, heads, h.data_ptr(), hb.data_ptr(), cu.data_ptr(), _address(cls_index),
              *_pack_fields(packed, cls_only), *(t.data_ptr() for t in (*biases, *norms)),
              _SMALL_DTYPES.index(bias_dtype), _SMALL_DTYPES.index(norm_dtype),
              *(_address(t) for t in (qkv, q, query_in, context, f, g_pairs, h1b, h2b, lse, h1, sum1, mean1, rstd1, h2,
                                      sum2, mean2, rstd2, workspace)), workspace.numel()]
    words = [int(word) for seed, offset, threshold, _ in dropouts for word in (seed, offset, threshold)]
    outputs = qkv, q, query_in, context, lse, h1, sum1, mean1, rstd1, h1b, f, g_pairs, h2, sum2, mean2, rstd2, h2b
    call = ("forward", (fields, words, [attn_scale, *eps, *(d[3] for d in dropouts)], torch.get_num_threads()),
            (h, hb, cu, cls_index, packed, biases, norms, outputs, workspace))
    if not run:
        return outputs, call
    run_encoder_layer(call)
    return outputs
