"""Entry point (README "Commands"): `--mode train --config configs/formal.py:pe=alibi
--workdir runs/a`, or `--mode eval --workdir runs/a --lengths 40,80,160`. Exit status: 0 done;
1 runtime failure (workdir.RunError); 2 bad configuration (ConfigError or an unloadable
--config: one line, nothing compiled); 128 + signal (130 SIGINT, 143 SIGTERM) after saving a
checkpoint: the same command resumes. --distributed: jax.distributed.initialize (automatic
when experiments/multi.py sets JAX_COORDINATOR_ADDRESS)."""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from attn.registry import ConfigError
from experiments import config_utils

config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:k=v,...]", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (created; re-running resumes).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (then evaluate) or evaluate only.")
flags.DEFINE_list("lengths", None, "Eval lengths, e.g. 40,80,160 (default: eval.lengths).")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize (SLURM, TPU pods).")


def _fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _parse(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
        if flags.FLAGS.mode == "train" or flags.FLAGS["config"].present:
            flags.FLAGS.config.get("seed")  # a missing file only raises when first read
    except Exception as e:  # every parse failure becomes one line, never a traceback
        _fail(*config_utils.describe_error(e, argv))
    return rest


def main(argv: list[str]) -> None:
    from experiments import evaluate, mesh, train
    from experiments.workdir import RunError

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax / tfds progress chatter
    f = flags.FLAGS
    try:
        if not f.workdir:
            raise ConfigError("--workdir: required; the directory of this run")
        lengths = config_utils.parse_lengths(f.lengths)
        mesh.init_distributed(f.distributed)
        if f.mode == "train":
            config = config_utils.reconcile_blocks(f.config, sys.argv)
            result = train.run(config, f.workdir, eval_lengths=lengths)
        else:
            result = evaluate.run(f.workdir, lengths=lengths)
    except (ConfigError, RunError) as e:
        _fail(str(e).splitlines()[0], 2 if isinstance(e, ConfigError) else 1)
    sys.exit(128 + result["interrupted"] if result.get("interrupted") else 0)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
