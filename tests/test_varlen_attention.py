"""Attention over packed sequences: the C++ kernel against the row-by-row reference (values and the three
gradients, fp32 and bf16, odd lengths, the strided views of a stacked projection, [CLS]-only queries), the exact
elements its dropout drops, the padded path it replaces, and a checkpoint's recomputation redrawing its mask."""
import pytest
import torch
from tiny import encoded_rows
from torch.utils.checkpoint import checkpoint

from fastcls.data import collate
from fastcls.models import attention as attn
from fastcls.ops import dispatch
from fastcls.ops.dropout import DropoutGenerator, MaskSource, keep_mask, recomputed_alike, source_mask, use_generator
from fastcls.ops.varlen_attention import varlen_attention, varlen_attention_reference

LENGTHS = [1, 2, 7, 33, 5]
HEADS = 3

needs_cpp = pytest.mark.skipif(dispatch.cpp_ext is None, reason="C++ extension not built")


def cumulative(lengths) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def projections(lengths, head_dim, dtype, generator, cls_only=False):
    """(leaves, q, k, v) as run_layer makes them: one stacked product's output chunked into strided [T, H, D]
    views; with cls_only, q of the rows' first tokens from a product of its own."""
    tokens, width = sum(lengths), HEADS * head_dim
    stacked = torch.randn(tokens, (2 if cls_only else 3) * width, generator=generator).to(dtype).requires_grad_()
    parts = stacked.chunk(2 if cls_only else 3, -1)
    if cls_only:
        own_q = torch.randn(len(lengths), width, generator=generator).to(dtype).requires_grad_()
        leaves, (k, v), q = [own_q, stacked], parts, own_q
    else:
        leaves, (q, k, v) = [stacked], parts
    return leaves, *(t.unflatten(-1, (HEADS, -1)) for t in (q, k, v))


def as_fp64(leaves):
    return [leaf.detach().double().requires_grad_() for leaf in leaves]


def regroup(leaves, cls_only):
    """q, k, v viewed from (possibly fp64 copies of) the leaves, as `projections` views them."""
    if cls_only:
        own_q, stacked = leaves
        return (t.unflatten(-1, (HEADS, -1)) for t in (own_q, *stacked.chunk(2, -1)))
    return (t.unflatten(-1, (HEADS, -1)) for t in leaves[0].chunk(3, -1))


@needs_cpp
@pytest.mark.parametrize("cls_only", [False, True], ids=["all-queries", "cls-queries"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("head_dim", [16, 32, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_the_fp64_reference(dtype, head_dim, p, cls_only, generator):
    leaves, q, k, v = projections(LENGTHS, head_dim, dtype, generator, cls_only)
    assert not q.is_contiguous() or cls_only
    cu_k = cumulative(LENGTHS)
    cu_q = cumulative([1] * len(LENGTHS)) if cls_only else cu_k
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    out = varlen_attention(q, k, v, cu_q, cu_k, max(LENGTHS), p, seed=seed, backend="cpp")
    assert out.dtype == dtype and out.shape == q.shape
    upstream = torch.randn(out.shape, generator=generator).to(dtype)
    grads = torch.autograd.grad(out, leaves, upstream)

    wide = as_fp64(leaves)
    expected = varlen_attention_reference(*regroup(wide, cls_only), cu_q, cu_k, p, seed=seed)
    expected_grads = torch.autograd.grad(expected, wide, upstream.double())
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), expected, **tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, **tol)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stacked_gradients_are_the_separate_ones(dtype, generator):
    """The backward writing q's, k's and v's gradients side by side into one [T, 3, H, D] tensor (what the fused
    encoder layer's stacked product takes) gives each one's bits, an empty row's zeros included."""
    from fastcls.ops import cpp

    lengths = [*LENGTHS, 0, 3]
    _, q, k, v = projections(lengths, 32, dtype, generator)
    cu = cumulative(lengths).to(torch.int64)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    out, lse = cpp.varlen_attention_forward(q, k, v, cu, cu, 0.2, seed, 4, 2**31, 2.0)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    args = (q, k, v, cu, cu, 0.2, seed, 4, 2**31, 2.0, grad_out, lse)
    separate = cpp.varlen_attention_backward(*args)
    stacked = cpp.varlen_attention_backward(*args, stacked=True)
    assert stacked.shape == (q.shape[0], 3, *q.shape[1:]) and stacked.is_contiguous()
    for i, grad in enumerate(separate):
        assert torch.equal(stacked[:, i], grad)


@needs_cpp
@pytest.mark.parametrize("through_generator", [False, True], ids=["seed", "generator"])
def test_dropout_drops_exactly_the_masks_elements(through_generator):
    """Uniform probabilities (q = 0) and one-hot values put probability j of query i in out[i, h, j]: the zeros
    are the dropped elements, which must be the mask's over the canonical index, row after row."""
    lengths, head_dim, p = [1, 2, 7, 33, 40], 40, 0.5
    cu = cumulative(lengths)
    q = torch.zeros(sum(lengths), HEADS, head_dim)
    v = torch.cat([torch.eye(n, head_dim) for n in lengths])[:, None, :].expand(-1, HEADS, -1).contiguous()
    if through_generator:
        generator = DropoutGenerator(seed=2**40 + 7)
        generator.state[1] = 12345
        generator.reserve(9)  # 3 counters, so the call starts mid-stream
        with use_generator(generator):
            out = varlen_attention(q, q, v, cu, cu, max(lengths), p)
        source = MaskSource(generator.state, 0, 3)
    else:
        out = varlen_attention(q, q, v, cu, cu, max(lengths), p, seed=99)
        source = MaskSource(None, 99, 0)
    keep = source_mask((HEADS * sum(n * n for n in lengths),), p, source, "cpu")
    first = 0
    for start, n in zip(cu.tolist(), lengths):
        block = out[start:start + n, :, :n].transpose(0, 1)  # [H, i, j]
        expected = keep[first:first + HEADS * n * n].view(HEADS, n, n)
        assert torch.equal(block != 0, expected)
        torch.testing.assert_close(block[expected], torch.full_like(block[expected], 2.0 / n))
        first += HEADS * n * n
    assert 0.4 < keep.float().mean() < 0.6


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equals_the_padded_path_without_dropout(dtype, generator):
    """The kernel gives what run_layer's padded path (to_heads, attention, from_heads) gives."""
    batch = collate(encoded_rows(LENGTHS), list(range(len(LENGTHS))), packed=True, pad_token_id=1)
    leaves, q, k, v = projections(LENGTHS, 32, dtype, generator)
    out = varlen_attention(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_len, 0.0).flatten(-2)
    padded = attn.attention(batch.to_heads(q), batch.to_heads(k), batch.to_heads(v),
                            batch.key_mask[:, None, None, :], 0.0)
    expected = batch.from_heads(padded.transpose(1, 2).flatten(-2))
    upstream = torch.randn(out.shape, generator=generator).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, expected, **tol)
    for got, want in zip(torch.autograd.grad(out, leaves, upstream), torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(got, want, **tol)


@needs_cpp
def test_checkpoint_recomputation_redraws_the_forwards_mask(generator):
    leaves, q, k, v = projections(LENGTHS, 32, torch.float32, generator)
    cu = cumulative(LENGTHS)
    upstream = torch.randn(q.shape, generator=generator)

    def attend(stacked):
        # sin saves the attention's output for its backward, as the output projection does in a layer: what
        # the recomputation must reproduce (the attention's own backward redraws its mask from its saved offset)
        return torch.sin(varlen_attention(*regroup([stacked], False), cu, cu, max(LENGTHS), 0.1))

    def gradient(run):
        with use_generator(DropoutGenerator(seed=5)):
            return torch.autograd.grad(run(leaves[0]), leaves, upstream)[0]

    plain = gradient(attend)
    checkpointed = gradient(lambda x: checkpoint(recomputed_alike(attend), x, use_reentrant=False))
    assert torch.equal(plain, checkpointed)
    # without recomputed_alike the recomputation would draw another mask: the test can tell
    redrawn = gradient(lambda x: checkpoint(attend, x, use_reentrant=False))
    assert not torch.equal(plain, redrawn)


def test_fp64_runs_the_reference_and_bad_lengths_are_refused(generator):
    leaves, q, k, v = projections(LENGTHS, 16, torch.float64, generator)
    cu = cumulative(LENGTHS)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, cu, 33, 0.2, seed=3),
                               varlen_attention_reference(q, k, v, cu, cu, 0.2, seed=3))
    with pytest.raises(ValueError, match="cu_seqlens_k must rise"):
        varlen_attention(q, k, v, cu, cumulative([2, 1, 7, 33, 4]), 33, 0.0)
    with pytest.raises(ValueError, match="cu_seqlens_q must rise"):
        varlen_attention(q, k, v, cumulative(LENGTHS[:-1]), cu, 33, 0.0)
    with pytest.raises(ValueError, match="longer than max_len 32"):
        varlen_attention(q, k, v, cu, cu, 32, 0.0)


def test_reference_mask_is_keep_mask_over_the_canonical_index():
    """Row r's block of the reference's mask is keep_mask's elements from H * sum_{r' < r} Lq Lk on."""
    lengths, head_dim = [3, 4], 8
    cu = cumulative(lengths)
    q = torch.zeros(sum(lengths), 1, head_dim)
    v = torch.cat([torch.eye(n, head_dim) for n in lengths])[:, None, :]
    out = varlen_attention_reference(q, q, v, cu, cu, 0.5, seed=11)
    keep = keep_mask((9 + 16,), 0.5, 11)
    assert torch.equal(out[3:, 0, :4] != 0, keep[9:].view(4, 4))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_attention_does_not_depend_on_the_rows_beside_it(dtype):
    """Bit for bit, whatever batch a row comes in: the frozen-prefix cache and exact resume rely on it."""
    heads, head_dim = 3, 32

    def attend(rows):
        lengths = [row.shape[0] for row in rows]
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        q, k, v = (t.unflatten(-1, (heads, head_dim)) for t in torch.cat(rows).chunk(3, -1))
        return varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max(lengths), 0.0)

    torch.manual_seed(3)
    row, long_row, short_row = (torch.randn(n, 3 * heads * head_dim).to(dtype) for n in (7, 50, 2))
    alone = attend([row])
    assert torch.equal(attend([long_row, row])[50:], alone)
    assert torch.equal(attend([short_row, long_row, row, short_row])[52:59], alone)
