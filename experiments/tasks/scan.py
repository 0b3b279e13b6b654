"""SCAN, built locally from its published grammar, with the length split.

Lake & Baroni 2018, "Generalization without Systematicity: On the Compositional Skills of
Sequence-to-Sequence Recurrent Networks" (arXiv 1711.00350; data: brendenlake/SCAN). The
grammar, as the paper gives it:
    C -> S and S | S after S | S          S -> V twice | V thrice | V
    V -> D opposite (left|right) | D around (left|right) | D (left|right) | U
    D -> U | turn                          U -> walk | look | run | jump
with [[u]] = its action (WALK, LOOK, RUN, JUMP), [[turn]] = no action, [[x dir]] = TURN_dir
[[x]], [[x opposite dir]] = TURN_dir TURN_dir [[x]], [[x around dir]] = (TURN_dir [[x]]) x 4,
[[x twice]] / [[x thrice]] = [[x]] repeated, [[a and b]] = [[a]] [[b]], [[a after b]] =
[[b]] [[a]]. That gives 34 V, 102 S and 20,910 commands, each with one action sequence; the
length split trains on the 16,990 commands of at most 22 actions and tests on the 3,920 of
24-48 (no command has 23). tests/test_frontier_tasks.py checks the counts and a digest of the
published split.

As a task: nominal length n = the number of actions. Training draws commands uniformly from
those with at most n actions, so max_length = 22 (fixed, the default) is the length split's
training set; the evaluation set at length n is every command with exactly n actions (capped
at eval.num_examples, in an order fixed by the seed), so the default evaluation lengths
24..48 are the test split (lengths with no command, such as 23, have an empty set and are a
ConfigError). The set is built in memory (no TFDS dataset: the whole grammar takes
milliseconds). Exact match per length (seq_acc); the papers' one number, accuracy over the
whole test split, is the mean over lengths weighted by each length's `num_examples`.

Symbols: the six actions first (the output alphabet), then the 13 command words, then `fill`.
"""

import functools

import numpy as np

from experiments.tasks.base import NUM_SPECIAL, RaggedTask, Task

ACTIONS = ("WALK", "LOOK", "RUN", "JUMP", "LTURN", "RTURN")
WORDS = (
    "walk",
    "look",
    "run",
    "jump",
    "turn",
    "left",
    "right",
    "opposite",
    "around",
    "twice",
    "thrice",
    "and",
    "after",
)
# the data files' names of the actions
PUBLISHED_ACTIONS = {
    **{a: f"I_{a}" for a in ACTIONS[:4]},
    "LTURN": "I_TURN_LEFT",
    "RTURN": "I_TURN_RIGHT",
}
MAX_WORDS = 9  # "walk opposite left thrice and run around right twice"


def _verbs() -> list[tuple[str, list[str]]]:
    """Every V of the grammar with its actions."""
    out = [(u, [u.upper()]) for u in WORDS[:4]]
    for x in (*WORDS[:4], "turn"):
        act = [] if x == "turn" else [x.upper()]
        for side in ("left", "right"):
            turn = "LTURN" if side == "left" else "RTURN"
            out.append((f"{x} {side}", [turn, *act]))
            out.append((f"{x} opposite {side}", [turn, turn, *act]))
            out.append((f"{x} around {side}", [turn, *act] * 4))
    return out


@functools.cache
def commands() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """All 20,910 (command, actions) pairs, in the grammar's order."""
    simple = []
    for v, act in _verbs():
        simple += [(v, act), (f"{v} twice", act * 2), (f"{v} thrice", act * 3)]
    out = [(s, tuple(a)) for s, a in simple]
    for s1, a1 in simple:
        for s2, a2 in simple:
            out.append((f"{s1} and {s2}", tuple(a1 + a2)))
            out.append((f"{s1} after {s2}", tuple(a2 + a1)))
    return tuple(out)


@functools.cache
def _encoded():
    """(input symbols (C, MAX_WORDS) padded with fill, input lengths, action symbols
    (C, 48) padded with 0, action counts), for every command."""
    cmds = commands()
    fill = len(ACTIONS) + len(WORDS)
    x = np.full((len(cmds), MAX_WORDS), fill, np.int32)
    y = np.zeros((len(cmds), max(len(a) for _, a in cmds)), np.int32)
    nx, ny = np.zeros(len(cmds), np.int64), np.zeros(len(cmds), np.int64)
    word = {w: len(ACTIONS) + i for i, w in enumerate(WORDS)}
    act = {a: i for i, a in enumerate(ACTIONS)}
    for i, (c, a) in enumerate(cmds):
        words = c.split()
        x[i, : len(words)] = [word[w] for w in words]
        y[i, : len(a)] = [act[s] for s in a]
        nx[i], ny[i] = len(words), len(a)
    return x, nx, y, ny


def published_line(command: str, actions) -> str:
    """A command as the data files write it: 'IN: ... OUT: I_WALK ...'."""
    return f"IN: {command} OUT: " + " ".join(PUBLISHED_ACTIONS[a] for a in actions)


class Scan(RaggedTask):
    """SCAN with the length split (module docstring). Example: `jump opposite left and walk
    thrice` -> `LTURN LTURN JUMP WALK WALK WALK`."""

    NAME = "scan"
    FAMILY = "compositional"
    METRIC = "seq_acc"
    LAYOUTS = ("decoder", "seq2seq")
    ALPHABET = len(ACTIONS) + len(WORDS) + 1
    OUTPUT_ALPHABET = len(ACTIONS)
    DEFAULTS = {
        **Task.DEFAULTS,
        "train_lengths": "fixed",
        "max_length": 22,
        "eval_lengths": (8, 16, 22, 24, 25, 26, 27, 28, 30, 32, 33, 36, 40, 48),
    }

    @property
    def chance(self):
        return None

    def input_length(self, n):
        return MAX_WORDS

    def output_length(self, n):
        return n

    def sample(self, rng, n, batch):
        x, _, y, ny = _encoded()
        pool = np.flatnonzero(ny <= n)
        pick = pool[rng.integers(0, len(pool), size=batch)]
        width = min(n, y.shape[1])
        out = np.zeros((batch, n), np.int32)
        out[:, :width] = y[pick, :width]
        mask = np.arange(n)[None, :] < ny[pick][:, None]
        return x[pick], out, mask

    def eval_source(self, length, *, num_examples, seed, data_dir=None):
        """Every command with exactly `length` actions (at most num_examples of them, in an
        order drawn from seed): a list of records."""
        del data_dir
        x, _, y, ny = _encoded()
        pool = np.flatnonzero(ny == length)
        order = np.random.default_rng([seed, length, self.id]).permutation(pool)[:num_examples]
        return [
            {
                "input": x[i] + NUM_SPECIAL,
                "output": y[i, :length] + NUM_SPECIAL,
                "output_mask": np.ones(length, bool),
            }
            for i in order
        ]

    def token_label(self, token_id):
        t = token_id - NUM_SPECIAL
        names = (*ACTIONS, *WORDS)
        return names[t] if 0 <= t < len(names) else "."


TASKS = (Scan,)
