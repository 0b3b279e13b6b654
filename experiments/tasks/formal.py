"""The 15 formal-language transduction tasks of Deletang et al. 2023.

"Neural Networks and the Chomsky Hierarchy" (arXiv 2207.02098), reference code
google-deepmind/neural_networks_chomsky_hierarchy. Written here from the task definitions;
vocabularies (input/output alphabet sizes), output lengths, accuracy masks and the degenerate
short-length cases follow the reference code, which produced the published numbers. Where
code and paper disagree the class docstring says so.

All symbols are task symbols 0..alphabet-1 (input_pipeline shifts them by NUM_SPECIAL).
Metric: per-sequence token accuracy over the output mask, averaged over sequences; chance is
uniform guessing over the output alphabet. Regular (R), deterministic context-free (DCF) and
context-sensitive (CS) levels are recorded in LEVEL.
"""

import math

import numpy as np

from experiments.tasks.base import (
    Task,
    Uniforms,
    full_mask,
    mask_through_terminator,
    random_bits,
)


class FormalTask(Task):
    FAMILY = "formal"
    METRIC = "token_acc"
    LEVEL = ""


# ----------------------------------------------------------------------------- regular


class EvenPairs(FormalTask):
    """Binary string -> 1 iff the number of unequal adjacent pairs ('01' and '10') is odd.

    Example: 001110 -> 0 (one '01', one '10'). Equivalent to first != last symbol.
    """

    NAME, LEVEL = "even_pairs", "R"

    def draw(self, rng, n, batch):
        return random_bits(rng, (batch, n))

    def solve(self, x):
        y = (np.sum(x[:, 1:] != x[:, :-1], axis=1) % 2)[:, None]
        return y, full_mask(len(x), 1)


class ParityCheck(FormalTask):
    """Binary string -> number of 1s mod 2. Example: 1010100 -> 1."""

    NAME, LEVEL = "parity_check", "R"

    def draw(self, rng, n, batch):
        return random_bits(rng, (batch, n))

    def solve(self, x):
        return (x.sum(1) % 2)[:, None], full_mask(len(x), 1)


class CycleNavigation(FormalTask):
    """Moves on a 5-cycle from state 0 -> final state.

    Symbols 0, 1, 2 mean -1 (left), 0 (stay), +1 (right), as in the reference code; worked
    example `1 -1 0 -1 -1 -> 3` is the symbol string 2 0 1 0 0.
    """

    NAME, LEVEL = "cycle_navigation", "R"
    ALPHABET, OUTPUT_ALPHABET = 3, 5

    def draw(self, rng, n, batch):
        return rng.integers(0, 3, size=(batch, n), dtype=np.int32)

    def solve(self, x):
        return ((x - 1).sum(1) % 5)[:, None], full_mask(len(x), 1)


MOD_PLUS, MOD_MINUS, MOD_TIMES = 5, 6, 7


class ModularArithmetic(FormalTask):
    """Expression d op d op ... d (digits mod 5, ops + - *) -> its value mod 5.

    Usual precedence (* before + and -). Input alphabet 9 = 5 digits + {+, -, *, _} as in the
    reference code (the blank '_' is never sampled). The input has odd length: the reference
    code silently uses n - 1 for even n, and so do we (input_length(n) = n - 1 for even n).
    The paper states the task for any n.
    """

    NAME, LEVEL = "modular_arithmetic", "R"
    ALPHABET, OUTPUT_ALPHABET = 9, 5

    def input_length(self, n):
        return n if n % 2 else n - 1

    def draw(self, rng, n, batch):
        k = self.input_length(n) // 2  # number of operators
        x = np.empty((batch, 2 * k + 1), np.int32)
        x[:, ::2] = rng.integers(0, 5, size=(batch, k + 1))
        x[:, 1::2] = rng.integers(MOD_PLUS, MOD_TIMES + 1, size=(batch, k))
        return x

    def solve(self, x):
        d, ops = x[:, ::2].astype(np.int64), x[:, 1::2]
        total = np.zeros(len(x), np.int64)
        term = d[:, 0]
        for i in range(ops.shape[1]):
            op, v = ops[:, i], d[:, i + 1]
            times = op == MOD_TIMES
            total = np.where(times, total, total + term)
            term = np.where(times, term * v, np.where(op == MOD_MINUS, -v, v)) % 5
        return ((total + term) % 5)[:, None], full_mask(len(x), 1)


# ------------------------------------------------------------------ deterministic context-free

STACK_POP, STACK_PUSH0, STACK_PUSH1, STACK_END = 2, 3, 4, 2


class StackManipulation(FormalTask):
    """Initial stack (bits, bottom to top) then actions POP=2, PUSH 0=3, PUSH 1=4 -> final stack.

    The output is the final stack top to bottom, a termination token 2, then zeros up to length
    n + 1; accuracy covers positions up to the termination token. POP on an empty stack does
    nothing. The stack part has length U{1..n-1}; n = 1 gives one bit and the same bit back
    (reference code).
    """

    NAME, LEVEL = "stack_manipulation", "DCF"
    ALPHABET, OUTPUT_ALPHABET = 5, 3

    def output_length(self, n):
        return n + 1

    def draw(self, rng, n, batch):
        if n == 1:
            return random_bits(rng, (batch, 1))
        stack_len = rng.integers(1, n, size=batch)
        bits = random_bits(rng, (batch, n))
        acts = rng.integers(STACK_POP, STACK_PUSH1 + 1, size=(batch, n), dtype=np.int32)
        return np.where(np.arange(n)[None, :] < stack_len[:, None], bits, acts).astype(np.int32)

    def solve(self, x):
        # Actions are never 0/1, so the initial stack is the longest prefix of bits.
        batch, n = x.shape
        is_stack = np.logical_and.accumulate(x < STACK_POP, axis=1)
        stack = np.zeros((batch, n + 1), np.int32)
        top = np.zeros(batch, np.int64)  # number of elements on the stack
        rows = np.arange(batch)
        for t in range(n):
            sym, init = x[:, t], is_stack[:, t]
            push = init | (sym >= STACK_PUSH0)
            value = np.where(init, sym, sym - STACK_PUSH0)
            stack[rows, np.where(push, top, n)] = np.where(push, value, 0)
            top = np.where(push, top + 1, np.where(sym == STACK_POP, np.maximum(top - 1, 0), top))
        pos = np.arange(n + 1)[None, :]
        src = np.clip(top[:, None] - 1 - pos, 0, n)
        y = np.where(pos < top[:, None], np.take_along_axis(stack, src, 1), 0)
        y = np.where(pos == top[:, None], STACK_END, y).astype(np.int32)
        return y, mask_through_terminator(y, STACK_END)


class ReverseString(FormalTask):
    """Binary string -> the string reversed."""

    NAME, LEVEL = "reverse_string", "DCF"

    def output_length(self, n):
        return n

    def draw(self, rng, n, batch):
        return random_bits(rng, (batch, n))

    def solve(self, x):
        return x[:, ::-1].copy(), full_mask(*x.shape)


BR_PLUS, BR_MINUS, BR_TIMES, BR_OPEN, BR_CLOSE = 5, 6, 7, 8, 9


def bracket_expression(u: Uniforms, length: int, mult: bool) -> tuple[list[int], int]:
    """Random bracketed expression of exactly `length` symbols and its value mod 5.

    Grammar of the reference code: lengths 1..4 are d, -d, (d), (-d); longer ones are
    (left op right) with |left| ~ U{1..length-4} and op uniform over {+, -} or {+, -, *}.
    """
    if length == 1:
        d = u.integer(0, 5)
        return [d], d
    if length == 2:
        d = u.integer(0, 5)
        return [BR_MINUS, d], -d % 5
    if length == 3:
        d = u.integer(0, 5)
        return [BR_OPEN, d, BR_CLOSE], d
    if length == 4:
        d = u.integer(0, 5)
        return [BR_OPEN, BR_MINUS, d, BR_CLOSE], -d % 5
    left_len = u.integer(1, length - 3)
    left, lv = bracket_expression(u, left_len, mult)
    right, rv = bracket_expression(u, length - 3 - left_len, mult)
    op = u.integer(0, 3 if mult else 2)
    value = (lv + rv, lv - rv, lv * rv)[op] % 5
    return [BR_OPEN, *left, (BR_PLUS, BR_MINUS, BR_TIMES)[op], *right, BR_CLOSE], value


class ModularArithmeticBrackets(FormalTask):
    """Bracketed expression over digits mod 5 with + - * -> its value mod 5.

    The reference experiments build this task with mult=True (constants.py). Input alphabet 11
    as in the reference code: 5 digits, + - * ( ), and an unused slot.
    """

    NAME, LEVEL = "modular_arithmetic_brackets", "DCF"
    ALPHABET, OUTPUT_ALPHABET = 11, 5

    def sample(self, rng, n, batch):
        u = Uniforms(rng, 2 * n * batch)
        xs, ys = zip(*(bracket_expression(u, n, mult=True) for _ in range(batch)), strict=True)
        return np.array(xs, np.int32), np.array(ys, np.int32)[:, None], full_mask(batch, 1)


EQ_PLUS, EQ_MINUS, EQ_OPEN, EQ_CLOSE, EQ_X, EQ_EQUALS = 5, 6, 7, 8, 9, 10
_BR_TO_EQ = {BR_PLUS: EQ_PLUS, BR_MINUS: EQ_MINUS, BR_OPEN: EQ_OPEN, BR_CLOSE: EQ_CLOSE}


class SolveEquation(FormalTask):
    """Bracketed + - equation mod 5 with one digit replaced by x, '=' and the value -> x.

    As in the reference code: the left side is a bracket expression of length n - 2 without
    multiplication (so x is unique), the hidden digit is the first digit at or after a uniform
    position (wrapping around), and n < 3 gives an all-zero input with answer 0.
    Alphabet: digits 0-4, + - ( ) x = (11 symbols).
    """

    NAME, LEVEL = "solve_equation", "DCF"
    ALPHABET, OUTPUT_ALPHABET = 11, 5

    def sample(self, rng, n, batch):
        if n < 3:
            return (
                np.zeros((batch, n), np.int32),
                np.zeros((batch, 1), np.int32),
                full_mask(batch, 1),
            )
        u = Uniforms(rng, 2 * n * batch)
        xs, ys = [], []
        for _ in range(batch):
            expr, value = bracket_expression(u, n - 2, mult=False)
            expr = [_BR_TO_EQ.get(s, s) if s >= 5 else s for s in expr]
            idx = u.integer(0, n - 2)
            while expr[idx] >= 5:
                idx = (idx + 1) % (n - 2)
            ys.append(expr[idx])
            expr[idx] = EQ_X
            xs.append([*expr, EQ_EQUALS, value])
        return np.array(xs, np.int32), np.array(ys, np.int32)[:, None], full_mask(batch, 1)


# ------------------------------------------------------------------------ context-sensitive


class DuplicateString(FormalTask):
    """Binary string s -> ss (output length 2n)."""

    NAME, LEVEL = "duplicate_string", "CS"

    def output_length(self, n):
        return 2 * n

    def draw(self, rng, n, batch):
        return random_bits(rng, (batch, n))

    def solve(self, x):
        return np.concatenate([x, x], 1), full_mask(len(x), 2 * x.shape[1])


MISSING, EMPTY = 2, 3


class MissingDuplicateString(FormalTask):
    """ss (|s| = n // 2) with one symbol replaced by 2, padded with 3 if n is odd -> that symbol.

    n = 1 gives input 1 and answer 1 (reference code). Input alphabet 4, output 2.
    """

    NAME, LEVEL = "missing_duplicate_string", "CS"
    ALPHABET, OUTPUT_ALPHABET = 4, 2

    def draw(self, rng, n, batch):
        if n == 1:
            return np.ones((batch, 1), np.int32)
        s = random_bits(rng, (batch, n // 2))
        dup = np.concatenate([s, s], 1)
        dup[np.arange(batch), rng.integers(0, dup.shape[1], size=batch)] = MISSING
        return np.concatenate([dup, np.full((batch, n % 2), EMPTY, np.int32)], 1)

    def solve(self, x):
        batch, n = x.shape
        if n == 1:
            return np.ones((batch, 1), np.int32), full_mask(batch, 1)
        half = n // 2
        idx = np.argmax(x == MISSING, axis=1)
        twin = np.where(idx < half, idx + half, idx - half)
        return x[np.arange(batch), twin][:, None], full_mask(batch, 1)


class OddsFirst(FormalTask):
    """Binary string s -> s[1::2] followed by s[::2] (0-based indices).

    The reference code puts the 0-based odd positions first; its docstring example and the
    paper's 1-based "s_1 s_3 s_5 ... first" describe the other order. We follow the code.
    """

    NAME, LEVEL = "odds_first", "CS"

    def output_length(self, n):
        return n

    def draw(self, rng, n, batch):
        return random_bits(rng, (batch, n))

    def solve(self, x):
        return np.concatenate([x[:, 1::2], x[:, ::2]], 1), full_mask(*x.shape)


BIN_OP, BIN_END = 2, 2


def _draw_operands(rng, n, batch):
    """Rows `a 2 b` of little-endian operands, |a| ~ U{1..n-2}, |b| = n-1-|a|, a, b >= 1."""
    len_a = rng.integers(1, n - 1, size=batch)
    pos = np.arange(n)[None, :]
    in_a = pos < len_a[:, None]
    in_b = pos > len_a[:, None]
    x = random_bits(rng, (batch, n))
    while True:  # each operand is uniform over 1..2^len-1: redraw rows with a zero operand
        bad = ~((x * in_a).any(1) & (x * in_b).any(1))
        if not bad.any():
            break
        x[bad] = random_bits(rng, (int(bad.sum()), n))
    return np.where(in_a | in_b, x, BIN_OP).astype(np.int32)


def _operands(x):
    """The operands of rows `a 2 b` as LE bit matrices of the row width."""
    n = x.shape[1]
    len_a = np.argmax(x == BIN_OP, axis=1)
    pos = np.arange(n)[None, :]
    a = np.where(pos < len_a[:, None], x, 0)
    src = np.clip(pos + len_a[:, None] + 1, 0, n - 1)
    b = np.where(pos < (n - 1 - len_a)[:, None], np.take_along_axis(x, src, 1), 0)
    return a, b


def _le_value(bits) -> int:
    return int(np.asarray(bits, np.uint8)[::-1].tobytes().translate(_BIT_CHARS) or b"0", 2)


_BIT_CHARS = bytes.maketrans(b"\x00\x01", b"01")


def _terminated(bits_BW, width):
    """LE bits without trailing zeros, then the terminator, then zeros: shape (B, width)."""
    b = bits_BW.shape[0]
    nz = bits_BW != 0
    last = np.where(nz.any(1), bits_BW.shape[1] - 1 - np.argmax(nz[:, ::-1], 1), 0)
    length = last + 1  # the number 0 is written '0'
    pos = np.arange(width)[None, :]
    padded = np.zeros((b, width), np.int32)
    w = min(width, bits_BW.shape[1])
    padded[:, :w] = bits_BW[:, :w]
    y = np.where(pos < length[:, None], padded, np.where(pos == length[:, None], BIN_END, 0))
    return y.astype(np.int32)


def _small_binary(rng, n, batch):
    """n <= 2 (reference code): a number in [0, 2^n - 1) written LE with n bits."""
    v = rng.integers(0, 2**n - 1, size=batch)
    return ((v[:, None] >> np.arange(n)[None, :]) & 1).astype(np.int32)


class BinaryAddition(FormalTask):
    """LE binary a 2 b -> LE binary a + b, termination token 2, zeros up to length n + 1.

    Reference-code details we follow: operands >= 1 and written LE padded with zeros to their
    sampled widths; the sum has no trailing (most-significant) zeros; accuracy covers up to and
    including the termination token. n <= 2 is degenerate in the code and here: the input is a
    number in [0, 2^n - 1) and the output is that number. The reference docstring shows
    `001 + 01101 -> 010112000`, one padding zero short of the n + 1 = 10 outputs it produces.
    """

    NAME, LEVEL = "binary_addition", "CS"
    ALPHABET, OUTPUT_ALPHABET = 3, 3

    def output_length(self, n):
        return n + 1

    def draw(self, rng, n, batch):
        return _small_binary(rng, n, batch) if n <= 2 else _draw_operands(rng, n, batch)

    def solve(self, x):
        batch, n = x.shape
        if n <= 2:
            y = _terminated(x, n + 1)
            return y, mask_through_terminator(y, BIN_END)
        a, b = _operands(x)
        s = np.zeros((batch, n + 1), np.int32)
        carry = np.zeros(batch, np.int32)
        for i in range(n):
            t = a[:, i] + b[:, i] + carry
            s[:, i], carry = t & 1, t >> 1
        s[:, n] = carry
        y = _terminated(s, n + 1)
        return y, mask_through_terminator(y, BIN_END)


class BinaryMultiplication(FormalTask):
    """LE binary a 2 b -> LE binary a * b, termination token 2, zeros up to length n.

    The product has at most n - 1 bits, so it always fits with its terminator. n <= 2 follows
    the reference code: output is n - 1 zeros then the terminator, whatever the input.
    """

    NAME, LEVEL = "binary_multiplication", "CS"
    ALPHABET, OUTPUT_ALPHABET = 3, 3

    def output_length(self, n):
        return n

    def draw(self, rng, n, batch):
        return _small_binary(rng, n, batch) if n <= 2 else _draw_operands(rng, n, batch)

    def solve(self, x):
        batch, n = x.shape
        if n <= 2:
            y = np.zeros((batch, n), np.int32)
            y[:, n - 1] = BIN_END
            return y, full_mask(batch, n)
        a, b = _operands(x)
        if n <= 63:  # the product has at most n - 1 bits: int64 arithmetic is exact
            weights = np.int64(1) << np.arange(n, dtype=np.int64)
            prod = (a @ weights) * (b @ weights)
            p = ((prod[:, None] >> np.arange(n)) & 1).astype(np.int32)
        else:  # Python bignums per row beat an O(n^2) bit-matrix product
            p = np.zeros((batch, n), np.int32)
            for i in range(batch):
                bits = format(_le_value(a[i]) * _le_value(b[i]), "b")[::-1]
                p[i, : len(bits)] = np.frombuffer(bits.encode(), np.uint8) - ord("0")
        y = _terminated(p, n)
        return y, mask_through_terminator(y, BIN_END)


class ComputeSqrt(FormalTask):
    """Big-endian binary x in [1, 2^n - 1] -> floor(sqrt(x)), big-endian, ceil(n/2) bits.

    Big-endian as in the reference code (zero-padded on the left to ceil(n/2) bits).
    """

    NAME, LEVEL = "compute_sqrt", "CS"

    def output_length(self, n):
        return math.ceil(n / 2)

    def draw(self, rng, n, batch):
        x = random_bits(rng, (batch, n))
        zero = ~x.any(1)
        while zero.any():
            x[zero] = random_bits(rng, (int(zero.sum()), n))
            zero = ~x.any(1)
        return x

    def solve(self, x):
        m = self.output_length(x.shape[1])
        y = np.empty((len(x), m), np.int32)
        for i, row in enumerate(x):
            r = math.isqrt(int("".join("01"[v] for v in row), 2))
            y[i] = [int(c) for c in format(r, f"0{m}b")]
        return y, full_mask(len(x), m)


class BucketSort(FormalTask):
    """String over 5 symbols -> the same symbols sorted increasingly."""

    NAME, LEVEL = "bucket_sort", "CS"
    ALPHABET, OUTPUT_ALPHABET = 5, 5

    def output_length(self, n):
        return n

    def draw(self, rng, n, batch):
        return rng.integers(0, 5, size=(batch, n), dtype=np.int32)

    def solve(self, x):
        return np.sort(x, 1), full_mask(*x.shape)


TASKS = (
    EvenPairs,
    ModularArithmetic,
    ParityCheck,
    CycleNavigation,
    StackManipulation,
    ReverseString,
    ModularArithmeticBrackets,
    SolveEquation,
    DuplicateString,
    MissingDuplicateString,
    OddsFirst,
    BinaryAddition,
    BinaryMultiplication,
    ComputeSqrt,
    BucketSort,
)
