"""Fault models (frozen dataclasses) and the sampling of fault sites.

Everything here is pure: integer tensors in, integer tensors out, randomness only from an
explicit CPU ``torch.Generator``.  Cost is proportional to the number of sites: a BER fault
draws ``K ~ Binomial(eligible bits, ber)`` and then ``K`` distinct sites, never one random
number per element or per bit-plane.

A *site* is ``(element, bit)``; bit 0 is the least significant bit of the format's code.
Sites come back sorted by element, then bit.

``bits`` (BitFlip, FlipCount, StuckAt) restricts the eligible bits of every code:

* ``None``: all bits of the format;
* an int ``b``: only bit ``b`` (BitFlip then has a per-bit BER: ``K ~ Binomial(N, ber)``);
* a tuple ``(lo, hi)``: the inclusive range ``lo..hi``;
* any other collection (list, set, range, tuple of length != 2): exactly those bits;
* a string: ``"30"``, ``"23-30"`` (range) or ``"0,5,9"`` (set), as a CLI would pass it.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qfi.errors import QfiError


def parse_bits(bits: object) -> None | int | tuple[int, int] | frozenset[int]:
    """Normalise a ``bits`` argument (see the module docstring); QfiError if malformed."""
    if bits is None or (isinstance(bits, str) and bits.strip().lower() in ("", "all")):
        return None
    if isinstance(bits, str):
        s = bits.replace(" ", "")
        try:
            if "," in s:
                return parse_bits(frozenset(int(b) for b in s.split(",")))
            for sep in ("..", "-", ":"):
                if sep in s:
                    lo, hi = s.split(sep)
                    return parse_bits((int(lo), int(hi)))
            return parse_bits(int(s))
        except ValueError:
            raise QfiError(f"bits {bits!r}: expected 'all', 'b', 'lo-hi' or 'b1,b2,...'") from None
    if isinstance(bits, bool):
        raise QfiError(f"bits must be an int, a (lo, hi) tuple or a set of ints, got {bits!r}")
    if isinstance(bits, int):
        if bits < 0:
            raise QfiError(f"bit {bits} is negative; bits are numbered from 0 (the LSB)")
        return bits
    if isinstance(bits, tuple) and len(bits) == 2 and all(type(b) is int for b in bits):
        lo, hi = bits
        if not 0 <= lo <= hi:
            raise QfiError(f"bit range {bits!r} must satisfy 0 <= lo <= hi")
        return (lo, hi)
    if isinstance(bits, Iterable):
        out = frozenset(bits)
        if not out or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in out):
            raise QfiError(f"bits {bits!r}: expected a non-empty collection of non-negative ints")
        return out
    raise QfiError(f"bits must be an int, a (lo, hi) tuple or a set of ints, got {bits!r}")


def resolve_bits(bits: object, nbits: int, fmt_name: str) -> Tensor:
    """The eligible bits (sorted int64) of a ``nbits``-bit format; QfiError outside 0..nbits-1.

    Cached per (bits, nbits): a trial should not pay for building this tensor.  Treat the result
    as read-only.
    """
    try:
        # the spec's type is part of the key: ``True == 1 == 1.0`` hash alike, but only 1 is valid
        return _resolve_bits_cached(type(bits), bits, nbits, fmt_name)
    except TypeError:  # unhashable spec (a list): resolve directly
        return _resolve_bits(bits, nbits, fmt_name)


@functools.lru_cache(maxsize=256)
def _resolve_bits_cached(_kind: type, bits: object, nbits: int, fmt_name: str) -> Tensor:
    return _resolve_bits(bits, nbits, fmt_name)


def _resolve_bits(bits: object, nbits: int, fmt_name: str) -> Tensor:
    b = parse_bits(bits)
    if b is None:
        out = list(range(nbits))
    elif isinstance(b, int):
        out = [b]
    elif isinstance(b, tuple):
        out = list(range(b[0], b[1] + 1))
    else:
        out = sorted(b)
    bad = [x for x in out if x >= nbits]
    if bad:
        raise QfiError(f"bit {bad[0]} is outside format {fmt_name!r}, whose bits are 0..{nbits - 1}")
    return torch.tensor(out, dtype=torch.int64)


def _check_prob(name: str, p: object) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise QfiError(f"{name}={p!r} is not a probability: allowed is 0 <= {name} <= 1")


def _check_count(count: object) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise QfiError(f"count={count!r}: allowed is an int >= 0")


@dataclass(frozen=True)
class BitFlip:
    """Every eligible bit of every selected code flips independently with probability ``ber``
    (so multi-bit upsets in one word occur at their natural rate)."""

    ber: float = 1e-6
    bits: object = None

    def __post_init__(self) -> None:
        _check_prob("ber", self.ber)
        object.__setattr__(self, "bits", parse_bits(self.bits))


@dataclass(frozen=True)
class FlipCount:
    """Exactly ``count`` distinct (element, bit) sites flip, uniform over the eligible sites."""

    count: int = 10
    bits: object = None

    def __post_init__(self) -> None:
        _check_count(self.count)
        object.__setattr__(self, "bits", parse_bits(self.bits))


@dataclass(frozen=True)
class FlipSites:
    """Explicit sites ``(name, flat_index, bit)``, index and bit integers (a float is refused, never
    truncated).  A site listed twice flips twice: no change."""

    sites: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", _check_sites(self.sites))


@dataclass(frozen=True)
class StuckAt:
    """The chosen sites read ``value`` (0 or 1).  Sites come from exactly one of ``ber``,
    ``count`` or ``sites`` (as in BitFlip, FlipCount, FlipSites).  A site already holding
    ``value`` changes nothing and is not a row of the FaultLog (whose rows are changed bits);
    ``FaultLog.sites`` counts every site drawn."""

    value: int = 0
    ber: float | None = None
    count: int | None = None
    bits: object = None
    sites: tuple[tuple[str, int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.value not in (0, 1) or isinstance(self.value, bool):
            raise QfiError(f"StuckAt value={self.value!r}: allowed are 0 and 1")
        given = [k for k in ("ber", "count", "sites") if getattr(self, k) is not None]
        if len(given) != 1:
            raise QfiError(f"StuckAt needs exactly one of ber=, count=, sites=; got {given or 'none'}")
        if self.ber is not None:
            _check_prob("ber", self.ber)
        if self.count is not None:
            _check_count(self.count)
        if self.sites is not None:
            object.__setattr__(self, "sites", _check_sites(self.sites))
        object.__setattr__(self, "bits", parse_bits(self.bits))


Fault = BitFlip | FlipCount | FlipSites | StuckAt


def _site_int(site: object, what: str, value: object) -> int:
    """``value`` as an int if it is an integer (int, numpy or torch integer), else QfiError: a float
    index such as 3.7 would be truncated silently, a bool is no index."""
    dtype = getattr(value, "dtype", None)
    if isinstance(value, bool) or dtype is not None and (dtype == torch.bool or str(dtype) == "bool"):
        raise QfiError(f"site {site!r}: {what} {value!r} is a bool; site indices and bits must be integers")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise QfiError(
            f"site {site!r}: {what} {value!r} is not an integer; site indices and bits must be "
            "integers (int, numpy or torch integers), never truncated floats"
        ) from None


def _check_sites(sites: object) -> tuple[tuple[str, int, int], ...]:
    out = []
    for s in sites:  # type: ignore[attr-defined]
        try:
            name, idx, bit = s
        except (TypeError, ValueError):
            raise QfiError(f"a site is (name, flat_index, bit), got {s!r}") from None
        if not isinstance(name, str):
            raise QfiError(f"site {s!r}: expected (str name, flat_index >= 0, bit >= 0)")
        idx, bit = _site_int(s, "index", idx), _site_int(s, "bit", bit)
        if idx < 0 or bit < 0:
            raise QfiError(f"site {s!r}: expected (str name, flat_index >= 0, bit >= 0)")
        out.append((name, idx, bit))
    return tuple(out)


def make_generator(generator: torch.Generator | None = None, seed: int | None = None) -> torch.Generator:
    """The CPU generator to sample with: ``generator``, else a fresh one seeded with ``seed``."""
    if generator is not None and seed is not None:
        raise QfiError("pass generator= or seed=, not both")
    if generator is not None:
        if generator.device.type != "cpu":
            raise QfiError(f"sites are sampled on the CPU; got a generator on {generator.device}")
        return generator
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(int(seed))
    else:
        g.seed()
    return g


def draw_binomial(n: int, p: float, generator: torch.Generator) -> int:
    """``K ~ Binomial(n, p)``, deterministic from ``generator``; one draw, any ``n`` up to 2**53."""
    if n == 0 or p == 0.0:
        return 0
    if p == 1.0:
        return n
    return int(torch.binomial(*_binomial_args(n, p), generator=generator))


@functools.lru_cache(maxsize=64)
def _binomial_args(n: int, p: float) -> tuple[Tensor, Tensor]:
    return torch.tensor(float(n), dtype=torch.float64), torch.tensor(float(p), dtype=torch.float64)


def sample_distinct(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct integers uniform in ``[0, n)``, sorted (int64).

    Draws with replacement, keeps the distinct values and redraws only the shortfall; when
    ``k`` is a large part of ``n`` a random permutation is cheaper and exact.
    """
    if k > n:
        raise QfiError(f"cannot choose {k} distinct sites among {n}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if 4 * k > n:
        return torch.randperm(n, generator=generator)[:k].sort().values
    s = sort_ints(torch.randint(0, n, (k,), generator=generator, dtype=torch.int64))
    while True:
        if not has_adjacent_equal(s):
            return s
        dup = s[1:] == s[:-1]
        s = s.masked_select(torch.cat([torch.ones(1, dtype=torch.bool), ~dup]))
        extra = torch.randint(0, n, (k - s.numel(),), generator=generator, dtype=torch.int64)
        s = merge_sorted(s, sort_ints(extra))


#: version of the site sampler: a seed gives the same sites within a version.  2: dense BER
#: sites from numpy PCG64 exponentials (1: torch uniforms).  Recorded in a campaign's manifest,
#: which warns when it resumes rows drawn by another version
SAMPLER_VERSION = 2

#: expected flips from which a BER fault draws its sites as a Bernoulli process (below: a
#: binomial count, then that many distinct sites); both give every site probability ber,
#: independently: the threshold depends only on (sites, ber), so a seed gives the same sites
DENSE_FLIPS = 1 << 16


def sample_bernoulli(n: int, p: float, generator: torch.Generator, *, chunk: int | None = None) -> Tensor:
    """Every integer in ``[0, n)`` independently with probability ``p``, sorted, in O(n p): the
    gaps between successive hits of a Bernoulli process are geometric, ``1 + floor(E / -log(1 -
    p))`` for a standard exponential ``E``, so their cumulative sums are the hits, sorted and
    distinct by construction (no binomial draw, no sort, no duplicate removal).

    The exponentials come from numpy's ziggurat on a PCG64 stream seeded by one draw of
    ``generator`` (the same seed gives the same sites): at a few million flips that stream, the
    exponential and numpy's int64 ``cumsum`` are each several times faster than torch's CPU
    ``rand``, ``log1p`` and ``cumsum``, and the sampling is the bulk of a dense trial.

    Gaps are drawn in chunks, the first one (``chunk``; default: the mean number of hits plus six
    standard deviations) almost always enough; the rest of ``[0, n)`` continues the same process."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))
    rng = np.random.Generator(np.random.PCG64(seed))
    inv_rate = -1.0 / math.log1p(-p)  # E * inv_rate: the failures before the next hit
    mean = n * p
    m = int(mean + 6 * math.sqrt(mean * (1 - p)) + 16) if chunk is None else chunk
    parts, last = [], -1
    while True:
        e = rng.standard_exponential(m)
        gaps = np.multiply(e, inv_rate, out=e).astype(np.int64)
        gaps += 1
        hits = np.cumsum(gaps, out=gaps)
        hits += last
        if int(hits[-1]) >= n:
            parts.append(hits[: int(np.searchsorted(hits, n))])
            break
        parts.append(hits)
        last = int(hits[-1])
        m = int((n - last) * p + 6 * math.sqrt((n - last) * p + 1) + 16) if chunk is None else chunk
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])


def sort_ints(x: Tensor) -> Tensor:
    """Sorted copy of a 1-D CPU int64 tensor of non-negative values.

    Below ~64k values numpy beats torch, and sorting as uint32 (when every value fits, as for
    the sites of up to 2**32 bits: a 134M-parameter fp32 model) halves numpy's time again.
    """
    if x.numel() < 65536:
        a = x.numpy()
        if a.size and int(a.max()) < 2**32:
            return torch.from_numpy(np.sort(a.astype(np.uint32)).astype(np.int64))
        return torch.from_numpy(np.sort(a))
    return x.sort().values


def has_adjacent_equal(x: Tensor) -> bool:
    """Whether a sorted 1-D CPU tensor holds a repeated value (numpy: fewer op overheads)."""
    a = x.numpy()
    return bool((a[1:] == a[:-1]).any())


def merge_sorted(a: Tensor, b: Tensor) -> Tensor:
    """Merge two sorted 1-D tensors in O(len(a) + len(b)) (no full re-sort)."""
    pos = torch.searchsorted(a, b, right=True) + torch.arange(b.numel())
    out = torch.empty(a.numel() + b.numel(), dtype=a.dtype)
    free = torch.ones(out.numel(), dtype=torch.bool).index_fill_(0, pos, False)
    return out.index_copy_(0, pos, b).masked_scatter_(free, a)


def sample_sites(
    fault: object, n_elems: int, eligible: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Sites ``(element, bit)`` of a BitFlip / FlipCount / StuckAt(ber|count) fault over
    ``n_elems`` codes whose eligible bits are ``eligible``; sorted by element then bit."""
    nb = eligible.numel()
    total = n_elems * nb
    ber = getattr(fault, "ber", None)
    if ber is not None and 0 < ber < 1 and total * ber >= DENSE_FLIPS:
        s = sample_bernoulli(total, float(ber), generator)  # dense: no binomial draw, no sort
        k = s.numel()
    else:
        k = draw_binomial(total, ber, generator) if ber is not None else int(fault.count)  # type: ignore[attr-defined]
        if k > total:
            raise QfiError(f"count={k} exceeds the {total} eligible (element, bit) sites")
        s = sample_distinct(total, k, generator)
    lo, hi = _ends(eligible)
    if nb == 1:
        return s, torch.full((k,), lo, dtype=torch.int64)
    if nb & (nb - 1) == 0 and hi - lo == nb - 1:  # a power-of-two run of bits
        shift = nb.bit_length() - 1
        a = s.numpy()  # CPU: numpy's per-op overhead is a fraction of torch's at these sizes
        return torch.from_numpy(a >> shift), torch.from_numpy((a & (nb - 1)) + lo)
    return torch.div(s, nb, rounding_mode="floor"), eligible.index_select(0, s.remainder(nb))


def _ends(eligible: Tensor) -> tuple[int, int]:
    a = eligible.numpy()
    return int(a[0]), int(a[-1])


def word_masks(elem: Tensor, bit: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """Group sorted distinct sites by word: ``(words, inverse, mask)`` with ``mask`` the int32
    bit pattern of each word's sites (bit 31 wraps to the sign, as in the code's int32 view).
    ``inverse`` (site -> word) is None when every site is in its own word.

    In numpy, O(sites) without a scatter: the mask of a word is the sum of its sites' distinct
    ``1 << bit``, a difference of one cumulative sum at the word's last site and at the previous
    word's (int64 wraparound cannot spoil a difference)."""
    e, b = elem.numpy(), bit.numpy()
    ones = np.left_shift(np.int64(1), b)
    if e.size < 2:
        return elem, None, torch.from_numpy(ones.astype(np.int32))
    first = np.empty(e.size, dtype=bool)
    first[0] = True
    np.not_equal(e[1:], e[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    if starts.size == e.size:  # the common case: every site in its own word
        # int64 -> int32 keeps the low 32 bits (bit 31 -> sign)
        return elem, None, torch.from_numpy(ones.astype(np.int32))
    cs = np.cumsum(ones, out=ones)
    last = np.empty_like(starts)
    last[:-1] = starts[1:] - 1
    last[-1] = e.size - 1
    at = cs[last]
    mask = at.copy()
    mask[1:] -= at[:-1]
    inv = np.cumsum(first, dtype=np.int64)
    inv -= 1
    return torch.from_numpy(e[starts]), torch.from_numpy(inv), torch.from_numpy(mask.astype(np.int32))


def to_int32(x: Tensor) -> Tensor:
    """The low 32 bits of non-negative int64 values as int32 (two's complement wraparound;
    the int64 -> int32 cast truncates, which tests/test_faults.py checks for bit 31)."""
    return x.to(torch.int32)


def odd_sites(elem: Tensor, bit: Tensor, parity: bool) -> tuple[Tensor, Tensor]:
    """Sort explicit sites and merge duplicates: with ``parity`` a site kept only if listed an
    odd number of times (two flips cancel), else kept once (stuck-at is idempotent)."""
    if elem.numel() == 0:
        return elem, bit
    key, counts = torch.unique(elem * 64 + bit, sorted=True, return_counts=True)
    if parity:
        key = key[counts % 2 == 1]
    return torch.div(key, 64, rounding_mode="floor"), key.remainder(64)


def apply_mask(codes: Tensor, mask: Tensor, value: int | None) -> Tensor:
    """Faulty codes: XOR with ``mask`` (value None), else force the mask's bits to ``value``."""
    if value is None:
        return codes ^ mask
    return codes | mask if value == 1 else codes & ~mask


__all__ = [
    "BitFlip", "FlipCount", "FlipSites", "StuckAt", "Fault", "SAMPLER_VERSION", "parse_bits", "resolve_bits",
    "make_generator",
    "draw_binomial", "sample_distinct", "sample_sites", "word_masks", "to_int32", "odd_sites", "apply_mask",
]
