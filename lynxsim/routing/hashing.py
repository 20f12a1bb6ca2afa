"""Counter-based random numbers: a pure function from integer keys to uniforms and standard normals.

Why not ``numpy.random.Generator``: a sequential generator hands out numbers in call order, so a token's
router logits would depend on which tokens were drawn before it (the batch composition, the scheduler's
order, the number of policies replayed, the worker process). The simulator compares selection policies
pair by pair on the *same* tokens, so a token's numbers must be a function of its name only:
``(seed, stream, request id, position, layer, expert)``. Here every number is the hash of such a tuple,
computed afresh, with no state: the same tuple gives the same bits in any batch, order or process.

The hash is the splitmix64 finalizer (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014; the constants are Vigna's Mix13 variant used by ``java.util.SplittableRandom``).
Keys are chained one word at a time, ``key' = mix64(key + word * GOLDEN)``: for a fixed key this is exactly
the splitmix64 stream seeded by that key and indexed by ``word``, which passes BigCrush, and ``mix64`` is a
bijection, so distinct words under one key never collide. All arithmetic is numpy ``uint64``, which wraps
modulo 2**64 as the algorithm requires.

Normals come from a table, not from a transform such as Box-Muller. Each 16-bit quarter of a hash word
indexes ``NORMAL_TABLE``, the 65,536 quantiles ``Phi^-1((i + 0.5) / 65536)`` of the standard normal, so one
word gives four normals, a table read each, where Box-Muller computed a ``log``, a ``sqrt`` and a ``sin`` or
``cos`` for every two (numpy: 1.5 against 3.5 ns per normal, measured on one core; the numba kernels of
``synthetic_kernels`` draw them far faster still). And no transcendental function runs at draw time: a
normal is integer arithmetic and a table read, so it is bit-identical on every machine and in every
implementation (this numpy code and the numba kernels), where numpy's SIMD ``log``/``sin``/``cos`` could
differ in the last bit between CPU instruction sets.

The price is a discrete distribution with cut tails, which no router statistic can see:

* 65,536 equally likely values, the ``i``-th at the probability centre of the ``i``-th of 65,536 equal
  slices of the normal: the distribution function is within 0.5 / 65536 = 7.6e-6 of the normal's everywhere,
  the sampling error of a distribution measured on 1e10 draws;
* the tails are cut at the extreme quantile, ``|z| <= 4.32``: a normal lies beyond it with probability 1.5e-5,
  and those draws land on the extreme values instead; the variance is 0.99998 instead of 1;
* neighbouring levels are 4e-5 standard deviations apart at the centre and 3e-4 at two (``1.5e-5 / phi(z)``),
  and a logit adds several normals with continuous weights (bias, request and token noise, scale), so its own
  distribution is smooth at any resolution a softmax or a ranking looks at. Exact ties between two experts
  of a token need equal levels in every term: with no popularity skew and no persistence (the only case where
  the token noise alone decides), a token's 8th and 9th best of 256 experts tie in 0.2% of draws (measured;
  none with the default parameters), and the lower id wins, which moves an expert's load by about 2e-4 of
  itself, below the sampling error of a load measured on fewer than 1e8 tokens.

The same concern makes the log-normal confidence scale exact: ``exp_exact`` is the exponential as a fixed
sequence of float64 multiplications and additions (Cody-Waite range reduction, a degree-13 polynomial and a
table of powers of two), so the numpy path and the numba kernel compute the same bits, on any machine, where
``numpy.exp`` and libm's ``exp`` may disagree in the last place.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd: the splitmix64 stream increment
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB

_U64_GOLDEN = np.uint64(_GOLDEN)
_U64_MUL1 = np.uint64(_MUL1)
_U64_MUL2 = np.uint64(_MUL2)

# The hash runs on blocks of this many 64-bit words so that its ~10 elementwise passes stay in the CPU's L2
# cache (measured with the Box-Muller draw this module used before its table: a 58x256x256 draw took about 18 ms
# this way against 33 ms in whole-array passes; blocks of 2**13 to 2**18 words were all within noise).
_BLOCK_WORDS = 1 << 14

NORMALS_PER_WORD = 4
"""Normals drawn from one 64-bit hash word: one per 16-bit quarter."""

_LEVELS = 1 << 16


def _normal_table() -> np.ndarray:
    """The standard normal's quantiles at the centres of 65,536 equal-probability slices, as float32.

    ``statistics.NormalDist.inv_cdf`` (Wichura's AS241, accurate to about 1e-16) evaluated in float64 by Python
    itself, then rounded once to float32: the same table on every machine (a last-bit difference of the float64
    could only matter for a value within 1e-16 of a float32 rounding boundary; a test pins the table's digest).
    """
    inv_cdf = statistics.NormalDist().inv_cdf
    table = np.array([inv_cdf((i + 0.5) / _LEVELS) for i in range(_LEVELS)], dtype=np.float64).astype(np.float32)
    table.flags.writeable = False
    return table


NORMAL_TABLE: np.ndarray = _normal_table()
"""float32 ``[65536]``: ``NORMAL_TABLE[i] = Phi^-1((i + 0.5) / 65536)``; exactly antisymmetric, ``|z| <= 4.32``."""


def _mix64_scalar(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def derive_key(seed: int, *words: int) -> int:
    """The key of a named stream: ``seed`` chained with ``words`` (e.g. a stream tag, a layer index).

    Python integers, so any non-negative or negative seed is accepted (taken modulo 2**64).
    """
    key = _mix64_scalar(seed & _MASK64)
    for word in words:
        key = _mix64_scalar((key + (word & _MASK64) * _GOLDEN) & _MASK64)
    return key


def _mix64_inplace(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer applied in place to a uint64 array (no temporaries besides one buffer)."""
    tmp = np.empty_like(z)
    for shift, mul in ((30, _U64_MUL1), (27, _U64_MUL2)):
        np.right_shift(z, np.uint64(shift), out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        np.multiply(z, mul, out=z)
    np.right_shift(z, np.uint64(31), out=tmp)
    np.bitwise_xor(z, tmp, out=z)
    return z


def combine(keys: np.ndarray | int, words: np.ndarray | int) -> np.ndarray:
    """Chain ``words`` into ``keys`` (broadcast): ``mix64(key + word * GOLDEN)`` as uint64.

    Signed words (e.g. int64 request ids) are reinterpreted modulo 2**64, which keeps them distinct.
    """
    k = np.asarray(keys).astype(np.uint64, copy=False)
    w = np.asarray(words).astype(np.uint64, copy=False)
    return _mix64_inplace(np.asarray(k + w * _U64_GOLDEN))


def uniforms(bits: np.ndarray) -> np.ndarray:
    """Float64 uniforms on the open interval (0, 1) from uint64 hash words, one per word (top 53 bits)."""
    top = (np.asarray(bits, dtype=np.uint64) >> np.uint64(11)).astype(np.float64)
    return (top + 0.5) * 2.0**-53


def normals(keys: np.ndarray | int, counters: np.ndarray | int) -> np.ndarray:
    """Standard normals hashed from ``keys`` and ``counters``, which broadcast to a shape ``S``.

    Returns float32 of shape ``S[:-1] + (4 * S[-1],)``: the word of ``(key, counter)`` at position ``[..., j]``
    gives four independent normals, ``NORMAL_TABLE`` at its bits ``16q`` to ``16q + 15``, placed at
    ``[..., 4 * j + q]`` for ``q = 0..3`` (the little-endian 16-bit view of the words, so no shuffle is needed).
    Each output is a function of its own key and counter only, which is what makes a draw for a token
    independent of the other tokens drawn with it.
    """
    k = np.asarray(keys).astype(np.uint64, copy=False)
    c = np.asarray(counters).astype(np.uint64, copy=False)
    words = np.atleast_1d(k + c * _U64_GOLDEN)
    n = words.shape[-1]
    out = np.empty(words.shape[:-1] + (NORMALS_PER_WORD * n,), dtype=np.float32)
    if out.size == 0:
        return out
    word_rows, out_rows = words.reshape(-1, n), out.reshape(-1, NORMALS_PER_WORD * n)
    step = max(1, _BLOCK_WORDS // n)
    for start in range(0, word_rows.shape[0], step):
        block = _mix64_inplace(word_rows[start : start + step])
        # '<u8' then '<u2': the quarters in bit order whatever the machine's byte order (a no-op on little-endian).
        quarters = block.astype("<u8", copy=False).view("<u2")
        np.take(NORMAL_TABLE, quarters, out=out_rows[start : start + step], mode="clip")  # in range: skip the check
    return out


# exp_exact: Cody-Waite reduction x = k * ln2 + r, |r| <= ln2 / 2, then exp(r) by Horner's rule on its Taylor
# series to degree 13 (truncation error below 4e-18, under float64's 1.1e-16 rounding) and exp(x) = exp(r) * 2**k,
# a product by a power of two, exact while it is a normal float64: hence the clamp to +-700 (exp(700) = 1e304).
# _LN2_HI has 32 significant bits (fdlibm's split), so k * _LN2_HI is exact for |k| < 2**21.
_INV_LN2 = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
EXP_LIMIT = 700.0
"""``exp_exact`` clamps its argument to ``[-EXP_LIMIT, EXP_LIMIT]``."""
EXP_COEFFICIENTS: tuple[float, ...] = tuple(1.0 / math.factorial(n) for n in range(13, -1, -1))
"""Taylor coefficients of exp, highest degree first (1/13!, ..., 1/1!, 1/0!), for Horner's rule."""
EXP_REDUCTION: tuple[float, float, float] = (_INV_LN2, _LN2_HI, _LN2_LO)
"""(1 / ln 2, ln 2 high part, ln 2 low part) of exp_exact's range reduction, for the numba kernel."""
POWERS_OF_TWO: np.ndarray = np.ldexp(1.0, np.arange(-1022, 1024))
"""float64 ``2**k`` at index ``k + 1022``, for every normal exponent ``k``: ``exp_exact``'s last factor (the numba
kernel builds the same numbers from their bits, which vectorizes where a table read does not)."""
POWERS_OF_TWO.flags.writeable = False


def exp_exact(x: np.ndarray) -> np.ndarray:
    """``exp(x)`` of float64 ``x`` (relative error about 2e-16; ``x`` clamped to ``[-700, 700]``) from IEEE
    multiplications and additions alone.

    Every step is one correctly rounded float64 operation, in a fixed order, so the result is the same bit for
    bit on every machine and in the numba kernel that repeats these steps (``synthetic_kernels``), unlike
    ``numpy.exp``, whose SIMD implementations and libm's may differ in the last place. The clamp changes no
    float32 result: ``exp(+-700)`` is far outside float32's range.
    """
    x = np.clip(np.asarray(x, dtype=np.float64), -EXP_LIMIT, EXP_LIMIT)
    k = np.floor(x * _INV_LN2 + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = np.full_like(r, EXP_COEFFICIENTS[0])
    for c in EXP_COEFFICIENTS[1:]:
        p *= r
        p += c
    result: np.ndarray = p * POWERS_OF_TWO[k.astype(np.intp) + 1022]
    return result
