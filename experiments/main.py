"""Entry point (README "Commands"): `--mode train --config F:k=v --workdir W`, or `--mode eval
--workdir W [--lengths 40,80] [--step N] [--name X] [--config.eval.num_examples=256 ...]`.
Exit 0 done; 1 RunError; 2 bad configuration (one line, nothing compiled); 128 + signal after
saving a checkpoint (re-running resumes). --distributed: jax.distributed.initialize."""

import logging
import sys

if __name__ == "__main__":  # from the first moment: a signal ends the process with one line
    from experiments.workdir import exit_on_signals

    exit_on_signals("experiments.main")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from attn.registry import ConfigError  # noqa: E402
from experiments import config_utils  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:k=v,...]", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (created; re-running resumes).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (then evaluate) or evaluate only.")
flags.DEFINE_list("lengths", None, "Eval lengths, e.g. 40,80,160 (default: eval.lengths).")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize (SLURM, TPU pods).")
flags.DEFINE_integer("step", None, "eval: the checkpoint step to evaluate (default: the latest).")
flags.DEFINE_string("name", None, "eval: the evaluation's name (default step<N>[-<hash>]).")
_OVERRIDES: list[str] = []  # --config.a.b=v without --config: eval's overrides of config.json


def _fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _parse(argv: list[str]) -> list[str]:
    rest, error = config_utils.parse_flags(flags.FLAGS, argv, _OVERRIDES)
    if error:
        _fail(*error)
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
            given = f["config"].present
            kw = dict(step=f.step, name=f.name, overrides=_OVERRIDES, config_given=given)
            result = evaluate.run(f.workdir, lengths=lengths, **kw)
    except (ConfigError, RunError) as e:
        _fail(str(e).splitlines()[0], 2 if isinstance(e, ConfigError) else 1)
    sys.exit(128 + result["interrupted"] if result.get("interrupted") else 0)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
