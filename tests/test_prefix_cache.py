import numpy as np
import pytest
import torch

from fastcls.components.prefix_cache import PrefixCache

HIDDEN = 37

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def make_rows(generator, num_rows=29):
    """Offsets of rows of 1 to 9 tokens (several of length 1), and every token's fp32 hidden state."""
    lengths = torch.randint(1, 10, (num_rows,), generator=generator).numpy().astype(np.int64)
    lengths[[0, num_rows // 2, num_rows - 1]] = 1
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    states = torch.randn(int(offsets[-1]), HIDDEN, generator=generator) * 3 + 0.5
    return offsets, states


def packed_rows(states, offsets, rows):
    return torch.cat([states[offsets[r] : offsets[r + 1]] for r in rows])


def fill(cache, states, offsets, generator, batch_size=4):
    """Store every row, in shuffled batches as a training epoch would."""
    order = torch.randperm(len(offsets) - 1, generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        cache.put(rows, packed_rows(states, offsets, rows).to(cache.device))
    return order


def total_bytes(offsets, dtype):
    return int(offsets[-1]) * HIDDEN * dtype.itemsize


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tier", ["memory", "disk", "split"])
def test_round_trip_is_exact_in_the_cache_dtype(device, dtype, tier, generator, tmp_path):
    offsets, states = make_rows(generator)
    split_row = len(offsets) // 2
    budget = {
        "memory": total_bytes(offsets, dtype),
        "disk": 0,
        # a budget ending inside row `split_row`: that row must go to disk whole
        "split": (int(offsets[split_row]) + 0.5) * HIDDEN * dtype.itemsize,
    }[tier]
    with PrefixCache(offsets, HIDDEN, device, int(budget), spill_dir=tmp_path, dtype=dtype) as cache:
        expected_rows = {"memory": len(offsets) - 1, "disk": 0, "split": split_row}[tier]
        assert cache.memory_rows == expected_rows
        assert cache.bytes_in_memory == int(offsets[expected_rows]) * HIDDEN * dtype.itemsize
        assert cache.bytes_in_memory + cache.bytes_on_disk == total_bytes(offsets, dtype)
        assert (cache.spill_path is None) == (tier == "memory")
        put_order = fill(cache, states, offsets, generator)
        assert cache.rows_filled == len(offsets) - 1 and cache.misses == len(offsets) - 1
        # read back in batches mixing the tiers, in an order unrelated to the one they were stored in
        get_order = torch.randperm(len(offsets) - 1, generator=generator).tolist()
        assert get_order != put_order
        for start in range(0, len(get_order), 7):
            rows = get_order[start : start + 7]
            out = cache.get(rows)
            assert out.dtype == dtype and out.device.type == device and out.shape[1] == HIDDEN
            assert torch.equal(out.cpu(), packed_rows(states, offsets, rows).to(dtype))
        assert cache.hits == len(offsets) - 1
        # what get returns is a copy: changing it leaves the cache as it was
        out.add_(1)
        assert torch.equal(cache.get(rows).cpu(), packed_rows(states, offsets, rows).to(dtype))


def test_split_lands_on_row_boundaries(generator):
    offsets, _ = make_rows(generator)
    for budget_tokens in range(int(offsets[-1]) + 2):
        with PrefixCache(offsets, HIDDEN, "cpu", budget_tokens * HIDDEN * 2) as cache:
            assert cache.memory_tokens in offsets
            assert cache.memory_tokens <= budget_tokens
            # the next row would not have fitted
            assert cache.memory_rows == len(offsets) - 1 or offsets[cache.memory_rows + 1] > budget_tokens
            assert cache.bytes_in_memory + cache.bytes_on_disk == total_bytes(offsets, torch.bfloat16)


def test_filled_tracks_rows_and_put_overwrites(generator, tmp_path):
    offsets, states = make_rows(generator)
    with PrefixCache(offsets, HIDDEN, "cpu", total_bytes(offsets, torch.bfloat16) // 2, spill_dir=tmp_path) as cache:
        rows = [len(offsets) - 2, 0, 3]  # one row on disk, two in memory
        assert not cache.filled(rows) and cache.rows_filled == 0
        cache.put(rows, torch.randn(len(packed_rows(states, offsets, rows)), HIDDEN, generator=generator))
        cache.put(rows, packed_rows(states, offsets, rows))
        assert cache.filled(rows) and cache.filled([3, 0]) and not cache.filled([0, 1])
        assert cache.rows_filled == 3
        assert torch.equal(cache.get(rows), packed_rows(states, offsets, rows).to(torch.bfloat16))
        assert cache.get([]).shape == (0, HIDDEN)


def test_put_stores_no_autograd_history(generator):
    offsets, states = make_rows(generator, num_rows=4)
    with PrefixCache(offsets, HIDDEN, "cpu", total_bytes(offsets, torch.bfloat16)) as cache:
        packed = packed_rows(states, offsets, [2, 1]).requires_grad_()
        cache.put([2, 1], packed * 2)
        out = cache.get([1, 2])
        assert not out.requires_grad
        assert torch.equal(out, (packed_rows(states, offsets, [1, 2]) * 2).to(torch.bfloat16))


def test_bad_input_is_named(generator):
    offsets, states = make_rows(generator, num_rows=6)
    with PrefixCache(offsets, HIDDEN, "cpu", 0) as cache:
        packed = packed_rows(states, offsets, [1, 2])
        with pytest.raises(ValueError, match="packed has .* tokens but rows \\[1, 2, 3\\]"):
            cache.put([1, 2, 3], packed)
        with pytest.raises(ValueError, match=f"packed must be \\[tokens, {HIDDEN}\\]"):
            cache.put([1, 2], packed[:, :-1])
        with pytest.raises(IndexError, match="row 6 is out of range for a prefix cache of 6 rows"):
            cache.put([1, 6], packed)
        with pytest.raises(IndexError, match="row -1 is out of range"):
            cache.get([-1])
        with pytest.raises(ValueError, match="rows must be a 1-D sequence of integer"):
            cache.filled([0.5])
        cache.put([1, 2], packed)
        with pytest.raises(ValueError, match="row 4 is not in the prefix cache yet \\(2 of the 4"):
            cache.get([2, 4, 1, 0])
        assert cache.hits == 0
    with pytest.raises(RuntimeError, match="closed"):
        cache.get([1])
    with pytest.raises(ValueError, match="offsets must start at 0"):
        PrefixCache([1, 3], HIDDEN, "cpu", 0)
    with pytest.raises(ValueError, match="offsets must start at 0 and never decrease"):
        PrefixCache([0, 3, 2], HIDDEN, "cpu", 0)
    with pytest.raises(ValueError, match="budget_bytes"):
        PrefixCache(offsets, HIDDEN, "cpu", -1)
    with pytest.raises(ValueError, match="hidden_size"):
        PrefixCache(offsets, 0, "cpu", 0)
    with pytest.raises(ValueError, match="dtype"):
        PrefixCache(offsets, HIDDEN, "cpu", 0, dtype=torch.int16)


def test_spill_file_is_removed(generator, tmp_path):
    offsets, states = make_rows(generator, num_rows=5)
    cache = PrefixCache(offsets, HIDDEN, "cpu", 0, spill_dir=tmp_path)
    cache.put([0, 4], packed_rows(states, offsets, [0, 4]))
    assert cache.spill_path.parent == tmp_path
    assert cache.spill_path.stat().st_size == cache.bytes_on_disk
    cache.close()
    assert list(tmp_path.iterdir()) == []
    cache.close()  # a second close is harmless

    # without a spill_dir, the cache's own temporary directory goes too, also when it is merely dropped
    cache = PrefixCache(offsets, HIDDEN, "cpu", 0)
    own_dir = cache.spill_path.parent
    assert own_dir.is_dir()
    del cache
    assert not own_dir.exists()
