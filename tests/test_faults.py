"""Fault models validate their arguments; site sampling is exact, distinct and reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qfi
from qfi.faults import (
    apply_mask,
    make_generator,
    merge_sorted,
    odd_sites,
    parse_bits,
    resolve_bits,
    sample_distinct,
    sample_sites,
    word_masks,
)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: qfi.BitFlip(ber=1.5), r"ber=1\.5.*0 <= ber <= 1"),
        (lambda: qfi.BitFlip(ber=-0.1), r"ber=-0\.1"),
        (lambda: qfi.FlipCount(count=-1), "count=-1"),
        (lambda: qfi.StuckAt(value=2, count=1), "value=2"),
        (lambda: qfi.StuckAt(value=0), "exactly one of"),
        (lambda: qfi.StuckAt(value=0, ber=0.1, count=3), "exactly one of"),
        (lambda: qfi.FlipSites(sites=(("w", -1, 0),)), "flat_index >= 0"),
        (lambda: qfi.BitFlip(bits=-3), "bit -3"),
        (lambda: qfi.BitFlip(bits=(5, 2)), r"\(5, 2\)"),
        (lambda: qfi.BitFlip(bits="x-y"), "'x-y'"),
    ],
)
def test_invalid_faults_raise(make, match: str) -> None:
    """Bad parameters raise QfiError (a ValueError) naming the value."""
    with pytest.raises(qfi.QfiError, match=match):
        make()
    assert issubclass(qfi.QfiError, ValueError)


def test_bit_specs() -> None:
    """None/int/(lo, hi)/collection/str spell the eligible bits; bits beyond the format raise."""
    assert parse_bits("all") is None and parse_bits("30") == 30 and parse_bits("23-30") == (23, 30)
    assert parse_bits("0,5,9") == frozenset({0, 5, 9}) == parse_bits([9, 5, 0])
    assert resolve_bits((3, 7), 8, "int8").tolist() == [3, 4, 5, 6, 7]
    assert resolve_bits([3, 7], 8, "int8").tolist() == [3, 7]
    assert resolve_bits(None, 4, "int4").tolist() == [0, 1, 2, 3]
    with pytest.raises(qfi.QfiError, match=r"bit 8 is outside format 'int8', whose bits are 0\.\.7"):
        resolve_bits(8, 8, "int8")
    assert qfi.BitFlip(bits=[1, 2]) == qfi.BitFlip(bits={2, 1})  # frozen and hashable


def test_sample_distinct_is_sorted_distinct_and_seeded() -> None:
    """k distinct sorted values in [0, n), the same for the same seed, different for another."""
    for n, k in [(10, 10), (1000, 300), (10**6, 5000), (2**40, 3)]:
        s = sample_distinct(n, k, make_generator(seed=1))
        assert s.numel() == k and s.unique().numel() == k and torch.equal(s, s.sort().values)
        assert int(s.min()) >= 0 and int(s.max()) < n
        assert torch.equal(s, sample_distinct(n, k, make_generator(seed=1)))
    assert not torch.equal(sample_distinct(10**6, 50, make_generator(seed=1)),
                           sample_distinct(10**6, 50, make_generator(seed=2)))
    with pytest.raises(qfi.QfiError, match="cannot choose 5 distinct sites among 4"):
        sample_distinct(4, 5, make_generator(seed=0))


def test_merge_sorted() -> None:
    """Merging two sorted tensors equals sorting their concatenation."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 100, (60,), generator=g).sort().values
    b = torch.randint(0, 100, (25,), generator=g).sort().values
    assert torch.equal(merge_sorted(a, b), torch.cat([a, b]).sort().values)


def test_sites_respect_bits_and_count() -> None:
    """FlipCount gives exactly count distinct sites, all on eligible bits; sorted by (elem, bit)."""
    g = make_generator(seed=3)
    for bits in (None, 30, (23, 30), [0, 31], (0, 15)):
        elig = resolve_bits(bits, 32, "fp32")
        e, b = sample_sites(qfi.FlipCount(200, bits=bits), 500, elig, g)
        key = e * 64 + b
        assert key.unique().numel() == 200 and torch.equal(key, key.sort().values)
        assert set(b.tolist()) <= set(elig.tolist()) and int(e.max()) < 500


def test_word_masks_combine_multi_bit_upsets() -> None:
    """Several bits of one word give one mask, the sum of distinct 1<<bit; bit 31 wraps to int32."""
    e = torch.tensor([4, 4, 4, 9])
    b = torch.tensor([0, 5, 31, 31])
    words, inv, mask = word_masks(e, b)
    assert words.tolist() == [4, 9] and inv is not None and inv.tolist() == [0, 0, 0, 1]
    assert mask.dtype == torch.int32
    assert mask.tolist() == [(1 | 32 | 2**31) - 2**32, -(2**31)]
    words, inv, mask = word_masks(torch.tensor([2, 5]), torch.tensor([31, 3]))
    assert inv is None and mask.tolist() == [-(2**31), 8]


def test_flipping_twice_is_identity() -> None:
    """XOR with the same mask twice restores every 16-bit code; duplicate sites cancel."""
    codes = torch.arange(2**16, dtype=torch.int32)
    mask = torch.randint(0, 2**16, (2**16,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(apply_mask(apply_mask(codes, mask, None), mask, None), codes)
    assert (apply_mask(codes, mask, 1) & mask).eq(mask).all()
    assert (apply_mask(codes, mask, 0) & mask).eq(0).all()
    e, b = odd_sites(torch.tensor([3, 3, 3, 7]), torch.tensor([5, 5, 2, 1]), parity=True)
    assert (e.tolist(), b.tolist()) == ([3, 7], [2, 1])
    e, b = odd_sites(torch.tensor([3, 3]), torch.tensor([5, 5]), parity=False)
    assert (e.tolist(), b.tolist()) == ([3], [5])


def test_generator_and_seed() -> None:
    """generator= and seed= are exclusive; CUDA generators are refused (sites sample on the CPU)."""
    with pytest.raises(qfi.QfiError, match="not both"):
        make_generator(torch.Generator(), 1)
    g = torch.Generator()
    assert make_generator(g) is g


def test_cached_bit_specs_keep_their_type() -> None:
    """resolve_bits is cached, but True and 1.0 (equal and hash-equal to 1) are still refused after
    1 was resolved, and a (lo, hi) range may not hold bools."""
    assert resolve_bits(1, 8, "int8").tolist() == [1]
    for bad in (True, 1.0):
        with pytest.raises(qfi.QfiError, match="bits must be an int"):
            resolve_bits(bad, 8, "int8")
    with pytest.raises(qfi.QfiError):
        parse_bits((True, 3))


@pytest.mark.parametrize("make", [lambda s: qfi.FlipSites((s,)), lambda s: qfi.StuckAt(1, sites=(s,))])
@pytest.mark.parametrize(
    ("site", "match"),
    [
        (("w", 3.7, 1), r"site \('w', 3\.7, 1\): index 3\.7 is not an integer.*integers"),
        (("w", 3.0, 1), r"index 3\.0 is not an integer"),
        (("w", 3, 1.5), r"bit 1\.5 is not an integer"),
        (("w", np.float32(2), 1), r"index (np\.float32\()?2\.0\)? is not an integer"),
        (("w", torch.tensor(2.0), 1), r"index tensor\(2\.\) is not an integer"),
        (("w", True, 1), r"index True is a bool"),
        (("w", 2, torch.tensor(True)), r"bit tensor\(True\) is a bool"),
        (("w", "3", 1), r"index '3' is not an integer"),
    ],
)
def test_non_integer_sites_are_refused_not_truncated(make, site, match: str) -> None:
    """A float (or bool, or string) site index or bit is a QfiError naming the site; it used to be
    truncated (3.7 -> 3) silently."""
    with pytest.raises(qfi.QfiError, match=match):
        make(site)


def test_integer_sites_of_numpy_and_torch_are_fine() -> None:
    """Integral numpy and torch scalars are valid site indices and bits, stored as ints."""
    f = qfi.FlipSites((("w", np.int64(3), np.uint8(2)), ("w", torch.tensor(4), 1)))
    assert f.sites == (("w", 3, 2), ("w", 4, 1)) and all(type(v) is int for s in f.sites for v in s[1:])


@pytest.mark.parametrize("chunk", [None, 997])
def test_dense_bernoulli_sites_follow_the_law(chunk):
    """Above DENSE_FLIPS expected flips, BER sites come from geometric gaps: sorted, distinct,
    in range, a Binomial(n, p) count (mean and variance) and uniform positions (chi-square); also
    when the gaps come in many small chunks (the continuation a 6-sigma first chunk rarely needs)."""
    import numpy as np
    from scipy import stats

    from qfi.faults import DENSE_FLIPS, sample_bernoulli

    n, p = 2_000_000, 0.05
    assert n * p >= DENSE_FLIPS
    g = torch.Generator().manual_seed(7)
    counts, hist = [], np.zeros(50)
    for _ in range(60):
        s = sample_bernoulli(n, p, g, chunk=chunk)
        assert bool((s[1:] > s[:-1]).all()) and int(s[0]) >= 0 and int(s[-1]) < n
        counts.append(s.numel())
        hist += np.bincount((s.numpy() * 50) // n, minlength=50)
    c = np.asarray(counts, dtype=float)
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(c.mean() - n * p) < 4 * sd / len(c) ** 0.5
    assert 0.6 < c.var(ddof=1) / sd**2 < 1.5
    assert stats.chisquare(hist).pvalue > 1e-4


def test_dense_bitflip_uses_the_bernoulli_sampler_reproducibly():
    """A BitFlip whose expected flips reach DENSE_FLIPS gives the same sites for the same seed and
    its per-bit sites stay on the chosen bit."""
    from qfi.faults import BitFlip, make_generator, resolve_bits, sample_sites

    fault = BitFlip(ber=0.02, bits=(0, 7))
    eligible = resolve_bits(fault.bits, 8, "int8")
    a = sample_sites(fault, 600_000, eligible, make_generator(None, 3))
    b = sample_sites(fault, 600_000, eligible, make_generator(None, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert abs(a[0].numel() - 600_000 * 8 * 0.02) < 5 * (600_000 * 8 * 0.02) ** 0.5
    assert int(a[1].min()) >= 0 and int(a[1].max()) <= 7
