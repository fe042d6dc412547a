"""The one attention implementation of fastcls's encoders: the layer-by-layer encoder calls it on both batch
layouts, and `fastcls.patch` routes transformers' attention interface through it.

softmax(q k^T * scale + mask) v over [B, H, L, D] tensors, with attention-probability dropout:
- where no dropout applies, or on CUDA (whose SDPA kernels drop in registers), torch's
  scaled_dot_product_attention;
- on the CPU with dropout, SDPA would fall back to its math path with torch's slow `bernoulli_` mask: the same
  math runs here with fastcls's mask-free dropout instead (`kernels=False`: torch's dropout, as SDPA would);
- unpadded bf16/fp16 batches on CUDA without dropout: variable-length flash attention (`varlen`);
- unpadded fp32/bf16 batches on the CPU with the kernels on: fastcls's packed-sequence kernel
  (`fastcls.ops.varlen_attention`), dropout included, with no padded block at all.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastcls.ops import dispatch
from fastcls.ops import dropout as mask_free_dropout

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.9
    varlen_attn = None

# cuDNN's attention builds an execution plan for every new sequence length, and length-grouped batches bring a new
# length at most steps (MiniLM on an H200: 3x slower steps in bf16); the other kernels do not
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_backends():
    """The SDPA kernels fastcls allows, as a context manager (the training loop and evaluation enter it on CUDA)."""
    return sdpa_kernel(SDPA_BACKENDS)


def recompute_in_the_same_context():
    """checkpoint's context_fn: the recomputation runs in the backward, outside the loop's backend choice, and
    must pick the same SDPA kernel as the forward did (another saves other tensors, and checkpoint refuses the
    mismatch: seen on an H200)."""
    return sdpa_backends(), sdpa_backends()


def attention(query, key, value, mask, p: float, *, scale: float | None = None, kernels: bool = True):
    """softmax(query key^T * scale + mask) value, dropout p on the probabilities. query [B, H, Lq, D], key and
    value [B, H, L, D]; mask: bool [B, 1|H, Lq|1, L] (True = attend), additive float, or None."""
    if p == 0.0 or query.is_cuda or not kernels:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p, scale=scale)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                  else scores + mask)
    # in the scores' own dtype: torch's CPU softmax accumulates bf16 rows in fp32 anyway, and an fp32 result would
    # only be rounded back for the product with the values
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(mask_free_dropout(probs, p, training=True), value)


def varlen_applies(query: torch.Tensor, p: float) -> bool:
    return p == 0.0 and varlen_attn is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)


def varlen_attention(query, key, value, cu_seqlens, max_len: int):
    """Each packed row's tokens attend to that row's: [T, H, D] in, [T, H, D] out."""
    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_len, max_len)


def packed_kernel_applies(query: torch.Tensor, kernels: bool) -> bool:
    """Whether fastcls's packed-sequence CPU kernel runs this attention (else the padded path). Never a choice per
    batch: a row's attention must not depend on the rows beside it (the frozen-prefix cache and exact resume rely
    on it), and the two paths round differently."""
    return kernels and query.device.type == "cpu" and dispatch.backend_for(
        "varlen_attention", query.device, query.dtype) == "cpp"
