"""Tasks: worked examples of Deletang et al. 2023, independent checkers, determinism, edges.

Each generator is checked against a plain-Python solver written from the task definition
(Python integers for arithmetic, sorted() for sorting, eval() for expressions) on many
random draws, and the reference code's worked examples are reproduced through `solve`.
"""

import math

import numpy as np
import pytest

from attn.registry import ConfigError
from experiments import tasks
from experiments.tasks import NUM_SPECIAL

TASK_NAMES = sorted(n for n, cls in tasks.REGISTRY.items() if cls.FAMILY != "text")
FORMAL = sorted(n for n, cls in tasks.REGISTRY.items() if cls.FAMILY == "formal")


def build(name, **kw):
    return tasks.build({"name": name, **kw})


def arr(s):
    return np.array([[int(c) for c in s]], np.int32)


def tostr(a):
    return "".join(str(int(v)) for v in a)


# ------------------------------------------------------------------------ worked examples


def test_binary_addition_worked_example():
    # 001 + 01101 -> 010112000 (4 + 22 = 26, little-endian); the code pads to n + 1 = 10.
    y, m = build("binary_addition").solve(arr("001201101"))
    assert tostr(y[0]) == "0101120000"
    assert m[0].tolist() == [True] * 6 + [False] * 4
    y, _ = build("binary_addition").solve(arr("10012000001"))  # 9 + 32 = 41
    assert tostr(y[0]) == "100101200000"


def test_binary_multiplication_worked_example():
    y, m = build("binary_multiplication").solve(arr("001201101"))  # 4 * 22 = 88
    assert tostr(y[0]) == "000110120"
    assert m[0].sum() == 8


def test_cycle_navigation_worked_example():
    # 1 -1 0 -1 -1 -> 3 on a 5-cycle; symbols 0/1/2 mean -1/0/+1.
    y, _ = build("cycle_navigation").solve(arr("20100"))
    assert y.tolist() == [[3]]
    y, _ = build("cycle_navigation").solve(arr("2220"))  # 1 1 1 -1 -> 2
    assert y.tolist() == [[2]]


def test_bucket_sort_worked_example():
    y, _ = build("bucket_sort").solve(arr("10204112"))
    assert tostr(y[0]) == "00111224"


@pytest.mark.parametrize(
    "expr,value", [("1+2*3", 2), ("1-1-1", 4), ("0*1+4*3-2", 0), ("4*4*4-3*2", 3)]
)
def test_modular_arithmetic_worked_examples(expr, value):
    code = {"+": 5, "-": 6, "*": 7}
    x = np.array([[code.get(c, None) if c in code else int(c) for c in expr]], np.int32)
    y, _ = build("modular_arithmetic").solve(x)
    assert y.tolist() == [[value]]


def test_other_worked_examples():
    # Stack: 0 1 1 0 PUSH1 POP POP -> 1 1 0 <end> 0 0 0 0 (top to bottom).
    y, m = build("stack_manipulation").solve(arr("0110422"))
    assert tostr(y[0]) == "11020000" and m[0].sum() == 4
    y, m = build("stack_manipulation").solve(arr("110222"))  # everything popped
    assert tostr(y[0]) == "2000000" and m[0].sum() == 1
    assert build("even_pairs").solve(arr("001110"))[0].tolist() == [[0]]
    assert build("even_pairs").solve(arr("0101001"))[0].tolist() == [[1]]
    assert build("parity_check").solve(arr("1010100"))[0].tolist() == [[1]]
    assert build("missing_duplicate_string").solve(arr("01100210"))[0].tolist() == [[1]]
    assert build("missing_duplicate_string").solve(arr("1011213"))[0].tolist() == [[0]]
    assert tostr(build("reverse_string").solve(arr("011010"))[0][0]) == "010110"
    assert tostr(build("duplicate_string").solve(arr("101"))[0][0]) == "101101"
    # Reference code order (0-based odd positions first), see OddsFirst's docstring.
    assert tostr(build("odds_first").solve(arr("00110101"))[0][0]) == "01110100"
    assert tostr(build("compute_sqrt").solve(arr("100101"))[0][0]) == "110"  # isqrt(37) = 6
    assert tostr(build("compute_sqrt").solve(arr("111"))[0][0]) == "10"


# --------------------------------------------------------------------- independent checkers

MOD_SYMBOLS = "01234+-*_"
BR_SYMBOLS = "01234+-*()"
EQ_SYMBOLS = "01234+-()x="


def _le_int(bits):
    return int("".join(str(b) for b in reversed(bits)) or "0", 2)


def _le_terminated(value, width):
    s = [int(c) for c in reversed(format(value, "b"))] + [2]
    return s + [0] * (width - len(s))


# One plain-Python checker per task: (x, y, m, task) -> asserts about one example, in task
# symbols. A checker returns False where the output mask may be partial.


def _even_pairs(x, y, m, task):
    assert y == [sum(a != b for a, b in zip(x, x[1:], strict=False)) % 2]


def _parity(x, y, m, task):
    assert y == [x.count(1) % 2]


def _cycle_navigation(x, y, m, task):
    pos = 0
    for a in x:
        pos = (pos + {0: -1, 1: 0, 2: 1}[a]) % 5
    assert y == [pos]


def _modular_arithmetic(x, y, m, task):
    assert len(x) % 2 == 1 and all(MOD_SYMBOLS[s] in "+-*" for s in x[1::2])
    assert y == [eval("".join(MOD_SYMBOLS[s] for s in x)) % 5]


def _stack_manipulation(x, y, m, task):
    n, k = len(x), 0
    while k < n and x[k] in (0, 1):
        k += 1
    stack = x[:k]
    assert k >= 1 and (n == 1 or k < n)
    for a in x[k:]:
        stack = stack[:-1] if a == 2 else stack + [a - 3]
    want = stack[::-1] + [2]
    assert y == want + [0] * (n + 1 - len(want))
    assert m == [True] * len(want) + [False] * (n + 1 - len(want))
    return False


def _reverse(x, y, m, task):
    assert y == x[::-1]


def _modular_arithmetic_brackets(x, y, m, task):
    assert y == [eval("".join(BR_SYMBOLS[s] for s in x)) % 5]


def _solve_equation(x, y, m, task):
    if len(x) < 3:
        assert x == [0] * len(x) and y == [0]
        return
    lhs, rhs = "".join(EQ_SYMBOLS[s] for s in x).split("=")
    assert len(rhs) == 1 and lhs.count("x") == 1 and "*" not in lhs
    assert y == [v for v in range(5) if eval(lhs.replace("x", str(v))) % 5 == int(rhs)]


def _duplicate_string(x, y, m, task):
    assert y == x + x


def _missing_duplicate_string(x, y, m, task):
    n = len(x)
    if n == 1:
        assert x == [1] and y == [1]
        return
    h = n // 2
    body = x[: 2 * h]
    assert x[2 * h :] == [3] * (n % 2) and body.count(2) == 1
    i = body.index(2)
    j = i + h if i < h else i - h
    assert y == [body[j]]
    body[i] = body[j]
    assert body[:h] == body[h:]


def _odds_first(x, y, m, task):
    assert y == [x[i] for i in range(1, len(x), 2)] + [x[i] for i in range(0, len(x), 2)]


def _binary_arithmetic(op, width_extra):
    def check(x, y, m, task):
        n = len(x)
        width = n + width_extra
        if n <= 2:
            assert y == (_le_terminated(_le_int(x), width) if width_extra else [0] * (n - 1) + [2])
            return False
        assert x.count(2) == 1
        i = x.index(2)
        a, b = _le_int(x[:i]), _le_int(x[i + 1 :])
        assert a >= 1 and b >= 1 and 1 <= i <= n - 2
        want = _le_terminated(op(a, b), width)
        assert y == want
        assert m == [k <= want.index(2) for k in range(width)]
        return False

    return check


def _compute_sqrt(x, y, m, task):
    v = int("".join(map(str, x)), 2)
    assert v >= 1
    assert y == [int(c) for c in format(math.isqrt(v), f"0{math.ceil(len(x) / 2)}b")]


def _sort(x, y, m, task):
    assert y == sorted(x)


def _copy(x, y, m, task):
    assert y == x


def _addition(x, y, m, task):
    k = (len(x) - 1) // 2
    assert x[k] == 10
    a, b = int("".join(map(str, x[:k]))), int("".join(map(str, x[k + 1 :])))
    assert y == [int(c) for c in str(a + b).zfill(k + 1)]


def _summation(x, y, m, task):
    assert y == [sum(x) % 10]


def _polynomial(x, y, m, task):
    v, coeffs = x[0], x[2:]
    assert x[1] == 10
    assert y == [sum(c * v**i for i, c in enumerate(coeffs)) % 10]


def _associative_recall(x, y, m, task):
    pairs = x[: len(x) - 1 - task.num_queries]
    keys, values = pairs[::2], pairs[1::2]
    assert len(set(keys)) == len(keys) and all(k >= 10 for k in keys)
    table = dict(zip(keys, values, strict=True))
    assert x[len(pairs)] == task.query_marker
    assert y == [table[q] for q in x[len(pairs) + 1 :]]


def _strip(x, task):
    """A ragged task's input without its fill padding."""
    return x[: len(x) - next((i for i, t in enumerate(reversed(x)) if t != task.fill), len(x))]


def _arithmetic(op):
    def check(x, y, m, task):
        x = _strip(x, task)
        k = x.index(task.op)
        a_tok, b_tok = x[:k], x[k + 1 :]
        y = y[: sum(m)]
        assert m == [True] * len(y) + [False] * (len(m) - len(y))
        offsets = set()

        def number(tokens, reverse):
            if task.hints:
                hints, digits = tokens[0::2], tokens[1::2]
                # a hint names its digit's significance (1 = least significant), from an offset
                sig = range(1, len(digits) + 1) if reverse else range(len(digits), 0, -1)
                offsets.update(h - 10 - (s - 1) for h, s in zip(hints, sig, strict=True))
            else:
                digits = tokens
            assert all(0 <= d < 10 for d in digits)
            return digits[::-1] if reverse else digits

        a = number(a_tok, task.cfg["reverse_operands"])
        b = number(b_tok, task.cfg["reverse_operands"])
        got = number(y, task.cfg["reverse_answer"])
        assert len(offsets) <= 1  # one hint sequence shared by both operands and the answer
        if task.cfg["pad"]:
            assert len(a) == len(b)
            width = len(a) + 1 if op is int.__add__ else 2 * len(a)
        else:
            assert a[0] != 0 or len(a) == 1
            assert b[0] != 0 or len(b) == 1
            width = 0
        want = str(op(int("".join(map(str, a))), int("".join(map(str, b))))).zfill(width)
        assert "".join(map(str, got)) == want
        return False

    return check


def _number_sort(x, y, m, task):
    x, y = _strip(x, task), y[: sum(m)]
    comma, rev = task.COMMA, task.cfg["reverse_operands"]

    def numbers(tokens):
        out, cur = [], []
        for t in [*tokens, comma]:
            if t == comma:
                out.append(int("".join(map(str, cur[::-1] if rev else cur))))
                cur = []
            else:
                cur.append(t)
        return out

    assert numbers(y) == sorted(numbers(x))
    assert sorted(y) == sorted(x)  # the same digits, written the same way
    return False


def _needle(x, y, m, task):
    c = task.cfg
    q = x.index(task.query)
    haystack, asked = x[:q], x[q + 1 :]
    table = {}
    for i, t in enumerate(haystack):
        if 10 <= t < 10 + c["num_keys"]:
            assert t not in table
            table[t] = haystack[i + 1 : i + 1 + c["value_digits"]]
    assert len(table) == c["num_needles"] and len(asked) == c["num_queries"]
    fillers = [t for t in haystack if t >= 10 + c["num_keys"]]
    assert len(haystack) - len(fillers) == c["num_needles"] * (1 + c["value_digits"])
    assert y == [d for k in asked for d in table[k]]


def _flip_flop(x, y, m, task):
    ops, bits = x[0::2], x[1::2]
    assert ops[0] == 2 and ops[-1] == 3  # starts with a write, ends with a read
    last = None
    for op, bit, want, read in zip(ops, bits, y, m, strict=True):
        assert read == (op == 3)
        if op == 2:
            last = bit
        if op == 3:
            assert bit == last == want
    return False


def _scan_meaning(words):
    if "and" in words:
        i = words.index("and")
        return _scan_meaning(words[:i]) + _scan_meaning(words[i + 1 :])
    if "after" in words:
        i = words.index("after")
        return _scan_meaning(words[i + 1 :]) + _scan_meaning(words[:i])
    if words[-1] in ("twice", "thrice"):
        return _scan_meaning(words[:-1]) * (2 if words[-1] == "twice" else 3)
    act = [] if words[0] == "turn" else [words[0].upper()]
    if len(words) == 1:
        return act
    turn = "LTURN" if words[-1] == "left" else "RTURN"
    if words[1] == "opposite":
        return [turn, turn, *act]
    if words[1] == "around":
        return [turn, *act] * 4
    return [turn, *act]


def _scan(x, y, m, task):
    from experiments.tasks import scan

    names = (*scan.ACTIONS, *scan.WORDS)
    words = [names[t] for t in _strip(x, task)]
    y = y[: sum(m)]
    assert [names[t] for t in y] == _scan_meaning(words)
    return False


CHECKERS = {
    "long_addition": _arithmetic(int.__add__),
    "long_multiplication": _arithmetic(int.__mul__),
    "number_sort": _number_sort,
    "passkey": _needle,
    "needle": _needle,
    "flip_flop": _flip_flop,
    "scan": _scan,
    "even_pairs": _even_pairs,
    "parity_check": _parity,
    "parity": _parity,
    "cycle_navigation": _cycle_navigation,
    "modular_arithmetic": _modular_arithmetic,
    "stack_manipulation": _stack_manipulation,
    "reverse_string": _reverse,
    "reverse": _reverse,
    "modular_arithmetic_brackets": _modular_arithmetic_brackets,
    "solve_equation": _solve_equation,
    "duplicate_string": _duplicate_string,
    "missing_duplicate_string": _missing_duplicate_string,
    "odds_first": _odds_first,
    "binary_addition": _binary_arithmetic(lambda a, b: a + b, 1),
    "binary_multiplication": _binary_arithmetic(lambda a, b: a * b, 0),
    "compute_sqrt": _compute_sqrt,
    "bucket_sort": _sort,
    "sort": _sort,
    "copy": _copy,
    "addition": _addition,
    "summation": _summation,
    "polynomial": _polynomial,
    "associative_recall": _associative_recall,
}


def check(name, x, y, m, task):
    """Plain-Python answer for one example (task symbols) -> assert equal."""
    assert name in CHECKERS, f"no checker for {name}"
    x, y, m = list(map(int, x)), list(map(int, y)), list(map(bool, m))
    if CHECKERS[name](x, y, m, task) is not False:
        assert all(m)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_against_independent_checker(name):
    task = build(name)
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 13, 24, 40, 63, 64):
        x, y, m = task.batch(rng, n, 24)
        assert x.min() >= 0 and x.max() < task.alphabet_size
        assert y.min() >= 0 and y.max() < task.OUTPUT_ALPHABET
        for i in range(len(x)):
            check(name, x[i], y[i], m[i], task)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_example_deterministic_and_shapes(name):
    task = build(name)
    for n in (1, 2, 40, 41):
        a, b = task.example(7, 3, n), task.example(7, 3, n)
        for k in ("input", "output", "output_mask"):
            np.testing.assert_array_equal(a[k], b[k])
        assert a["input"].shape == (task.input_length(n),)
        assert a["output"].shape == a["output_mask"].shape == (task.output_length(n),)
        assert a["input"].dtype == np.int32 and a["output_mask"].dtype == bool
        assert a["input"].min() >= NUM_SPECIAL and a["input"].max() < task.vocab_size
        assert a["output"].min() >= NUM_SPECIAL and a["output"].max() < task.vocab_size
    draws = {tuple(task.example(7, i, 40)["input"]) for i in range(8)}
    assert len(draws) > 1  # the index matters
    assert not np.array_equal(task.example(7, 0, 40)["input"], task.example(8, 0, 40)["input"])


@pytest.mark.parametrize("name", FORMAL)
def test_longest_eval_length(name):
    task = build(name)
    n = max(task.cfg["eval_lengths"])
    assert n == 500
    rng = np.random.default_rng(1)
    x, y, m = task.batch(rng, n, 2)
    for i in range(2):
        check(name, x[i], y[i], m[i], task)


# Deletang et al. 2023 (reference code): input alphabet, output alphabet, output length(n).
PUBLISHED = {
    "even_pairs": (2, 2, lambda n: 1),
    "modular_arithmetic": (9, 5, lambda n: 1),
    "parity_check": (2, 2, lambda n: 1),
    "cycle_navigation": (3, 5, lambda n: 1),
    "stack_manipulation": (5, 3, lambda n: n + 1),
    "reverse_string": (2, 2, lambda n: n),
    "modular_arithmetic_brackets": (11, 5, lambda n: 1),
    "solve_equation": (11, 5, lambda n: 1),
    "duplicate_string": (2, 2, lambda n: 2 * n),
    "missing_duplicate_string": (4, 2, lambda n: 1),
    "odds_first": (2, 2, lambda n: n),
    "binary_addition": (3, 3, lambda n: n + 1),
    "binary_multiplication": (3, 3, lambda n: n),
    "compute_sqrt": (2, 2, lambda n: math.ceil(n / 2)),
    "bucket_sort": (5, 5, lambda n: n),
}


def test_published_vocabularies_and_lengths():
    assert set(PUBLISHED) == set(FORMAL)
    for name, (vin, vout, out_len) in PUBLISHED.items():
        task = build(name)
        assert (task.ALPHABET, task.OUTPUT_ALPHABET) == (vin, vout), name
        assert task.vocab_size == NUM_SPECIAL + max(vin, vout)
        assert task.family == "formal" and task.metric == "token_acc"
        assert task.chance == pytest.approx(1 / vout)
        for n in (1, 2, 39, 40, 500):
            assert task.output_length(n) == out_len(n), (name, n)
    assert build("modular_arithmetic").input_length(40) == 39


def test_length_distributions():
    uni = build("parity_check")
    lengths = [uni.train_length(0, s) for s in range(400)]
    assert min(lengths) == 1 and max(lengths) == 40
    assert lengths == [uni.train_length(0, s) for s in range(400)]
    assert lengths != [uni.train_length(1, s) for s in range(400)]
    fixed = build("parity_check", train_lengths="fixed", max_length=17)
    assert {fixed.train_length(0, s) for s in range(20)} == {17}
    assert build("text", max_length=256).train_length(0, 5) == 256  # min_length 512 ignored
    cur = build("parity_check", train_lengths="curriculum", min_length=3, curriculum_steps=100)
    assert cur.train_length(0, 0) == 3
    early = [cur.train_length(0, s) for s in range(10)]
    late = [cur.train_length(0, s) for s in range(200, 400)]
    assert max(early) <= 3 + round(0.09 * 37) and max(late) == 40 and min(late) >= 3


def test_config_errors():
    with pytest.raises(ConfigError, match="task.name"):
        tasks.build({"name": "nope"})
    with pytest.raises(ConfigError, match="task.bogus"):
        build("parity_check", bogus=1)
    with pytest.raises(ConfigError, match="train_lengths"):
        build("parity_check", train_lengths="exponential")
    with pytest.raises(ConfigError, match="curriculum_steps"):
        build("parity_check", train_lengths="curriculum")
    with pytest.raises(ConfigError, match="num_keys"):
        build("associative_recall", max_length=200, num_keys=64)


def test_registry_defaults_are_config_blocks():
    for name, cls in tasks.REGISTRY.items():
        block = tasks.default_config(name)
        assert block["name"] == name and set(cls.DEFAULTS) <= set(block)
        task = tasks.build(block)
        assert task.vocab_size > NUM_SPECIAL and set(task.layouts) <= {
            "encoder",
            "decoder",
            "seq2seq",
        }


@pytest.mark.parametrize("name", TASK_NAMES)
def test_examples_equal_example(name):
    task = build(name)
    for n in (1, 3, 12):
        many = task.examples(11, range(4, 9), n)
        for j, i in enumerate(range(4, 9)):
            one = task.example(11, i, n)
            for k in one:
                np.testing.assert_array_equal(many[k][j], one[k])
