"""FusedAdamW's reference backend: its step and its gradient sum of squares in PyTorch ops, for every device
and dtype, without a host sync (see `fastcls.optim.adamw`)."""
import torch


def grad_sum_of_squares_reference(grads: list[torch.Tensor], grad_scale: torch.Tensor | None) -> torch.Tensor:
    """The sum of the squares of every element of `grads`, each divided by grad_scale (a one-element tensor)
    first, as a 0-dim fp64 tensor on the gradients' device: per tensor torch's own 2-norm in fp32 (fp64 for fp64
    gradients), squared and summed in fp64."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for grad in grads:
        norm = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
        total = total + norm.to(torch.float64).square()
    if grad_scale is not None:
        total = total / grad_scale.to(total.device, torch.float64).square()
    return total


def adamw_reference(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor | None],
    master_params: list[torch.Tensor | None], steps: list[torch.Tensor], *, lr: float | torch.Tensor,
    beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
    bias_correction: bool, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
) -> None:
    """The AdamW step of `fastcls.optim.adamw`'s module doc on lists of tensors, with PyTorch ops in the order
    of torch's single-tensor AdamW (fp32 math, fp64 for fp64 tensors; bias corrections in fp64). Never syncs with
    the device: with found_inf, new values are computed and then discarded element-wise where found_inf is
    nonzero. clip_coef (a one-element tensor) multiplies the unscaled gradients, which are not rewritten."""
    def commit(target: torch.Tensor, value: torch.Tensor, skip: torch.Tensor | None) -> None:
        value = value.to(target.dtype)
        target.copy_(value if skip is None else torch.where(skip, target, value))

    for i, param in enumerate(params):
        device = param.device
        skip = None if found_inf is None else found_inf.to(device, non_blocking=True) != 0

        compute = torch.promote_types(param.dtype, torch.float32)
        grad = grads[i].to(compute)
        if grad_scale is not None:
            grad = grad / grad_scale.to(device, non_blocking=True)
            commit(grads[i], grad, skip)
        if clip_coef is not None:
            grad = grad * clip_coef.to(device, non_blocking=True)
        if maximize:
            grad = -grad
        weight = (param if master_params[i] is None else master_params[i]).to(compute)
        if weight_decay != 0:
            weight = weight * (1 - lr * weight_decay)
        exp_avg = exp_avgs[i].to(compute).lerp(grad, 1 - beta1)
        exp_avg_sq = torch.addcmul(exp_avg_sqs[i].to(compute) * beta2, grad, grad, value=1 - beta2)
        second_moment = exp_avg_sq
        if amsgrad:
            second_moment = torch.maximum(max_exp_avg_sqs[i].to(compute), exp_avg_sq)
            commit(max_exp_avg_sqs[i], second_moment, skip)
        step = steps[i] + 1
        if bias_correction:
            t = step.to(torch.float64)
            step_size = lr / (1 - beta1**t)
            bias_correction2_sqrt = (1 - beta2**t).sqrt()
        else:
            step_size, bias_correction2_sqrt = lr, 1.0
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
        weight = weight + (-step_size * exp_avg) / denom
        commit(exp_avgs[i], exp_avg, skip)
        commit(exp_avg_sqs[i], exp_avg_sq, skip)
        if master_params[i] is not None:
            commit(master_params[i], weight, skip)
        commit(param, weight, skip)
        commit(steps[i], step, skip)
