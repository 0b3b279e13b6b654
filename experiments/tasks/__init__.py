"""Task registry: formal languages (Deletang et al. 2023), algorithmic prompt->answer tasks
(Kazemnejad et al. 2023), byte-level text corpora (Press et al. 2022 evaluation), and the
2024-25 frontier: arithmetic with operands of independent lengths and number sorting
(arithmetic.py), passkey / needle retrieval and the flip-flop language (retrieval.py), and the
SCAN length split (scan.py).

`REGISTRY[name]` is a Task class with `DEFAULTS` (its config fields, including the training
length distribution and evaluation lengths); `build(cfg)` turns a config task block
`{"name": ..., **DEFAULTS}` into a Task. Special ids are shared by every task and layout:
PAD=0, BOS=1, SEP=2 (also EOS), BLANK=3; task symbols start at NUM_SPECIAL=4.
"""

from attn.registry import lookup
from experiments.tasks import algorithmic, arithmetic, formal, retrieval, scan, text
from experiments.tasks.base import BLANK, BOS, EOS, NUM_SPECIAL, PAD, SEP, Task

REGISTRY: dict[str, type[Task]] = {
    cls.NAME: cls
    for cls in (
        *formal.TASKS,
        *algorithmic.TASKS,
        *text.TASKS,
        *arithmetic.TASKS,
        *retrieval.TASKS,
        *scan.TASKS,
    )
}


def default_config(name: str) -> dict:
    """The config block for task `name`: {"name": name, **DEFAULTS}."""
    return {"name": name, **lookup(REGISTRY, name, "task.name").DEFAULTS}


def build(cfg) -> Task:
    """Build the task named by cfg["name"] with the remaining fields as its config."""
    cfg = dict(cfg)
    return lookup(REGISTRY, cfg["name"], "task.name")(cfg)


__all__ = [
    "BLANK",
    "BOS",
    "EOS",
    "NUM_SPECIAL",
    "PAD",
    "REGISTRY",
    "SEP",
    "Task",
    "build",
    "default_config",
]
