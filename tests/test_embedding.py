"""The row-accumulated embedding leaves in .grad what torch's embedding leaves there, step after step."""
import pytest
import torch
import torch.nn.functional as F

from fastcls.ops.embedding import row_accumulated_embedding


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_gradients_match_torch_across_steps_and_accumulation(padding_idx):
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(37, 5, generator=generator)
    ours, theirs = table.clone().requires_grad_(), table.clone().requires_grad_()
    # steps of one or two backward calls (accumulation), with .grad reset to None between steps
    for step in range(4):
        for _ in range(1 + step % 2):
            ids = torch.randint(0, 37, (2, 9), generator=generator)
            ids[0, :3] = 3  # repeated ids, and the padding row
            upstream = torch.randn(2, 9, 5, generator=generator)
            (row_accumulated_embedding(ids, ours, padding_idx) * upstream).sum().backward()
            (F.embedding(ids, theirs, padding_idx) * upstream).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-6)
        kept = ours.grad
        ours.grad = theirs.grad = None
    assert kept.data_ptr() == ours._fastcls_row_grad[0].data_ptr()  # one buffer, reused


def test_accumulating_past_the_table_size_zeroes_it_all_next_time():
    generator = torch.Generator().manual_seed(1)
    ours, theirs = (torch.randn(6, 4, generator=generator).requires_grad_() for _ in range(2))
    theirs.data.copy_(ours.data)
    for _ in range(3):  # 3 x 4 ids > 6 rows: the touched-row list gives way to a full zeroing
        ids = torch.randint(0, 6, (4,), generator=generator)
        row_accumulated_embedding(ids, ours).sum().backward()
        F.embedding(ids, theirs).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)
    ours.grad = theirs.grad = None
    ids = torch.tensor([1])
    row_accumulated_embedding(ids, ours).sum().backward()
    F.embedding(ids, theirs).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_without_gradients_it_is_torch_embedding():
    table = torch.randn(7, 3)
    ids = torch.tensor([[1, 6], [0, 0]])
    torch.testing.assert_close(row_accumulated_embedding(ids, table), F.embedding(ids, table))
