"""Optimizers and learning-rate schedules: two registries of optax transforms.

`OPTIMIZERS` (adam, adamw, sgd) and `SCHEDULES` (constant, cosine, linear, rsqrt, each with a
linear warmup) map a config name to a class with `DEFAULTS` (its config fields) and `make`.
`make_optimizer(config)` chains global-norm clipping (`train.grad_clip`) with the optimizer,
whose learning rate optax injects as a hyperparameter (`optax.inject_hyperparams`), so the
rate applied at each step is in the optimizer state and the logs read it from there
(`learning_rate`). With `train.skip_nonfinite` the whole chain is wrapped in
`optax.apply_if_finite`: an update whose gradients are not finite is skipped and counted
(`skipped_updates`). Protocol defaults follow Deletang et al. 2023 (arXiv 2207.02098): Adam,
gradient clipping 1.0.
"""

import inspect

import jax
import jax.numpy as jnp
import optax

from attn.registry import lookup

# Consecutive non-finite updates apply_if_finite skips before it applies one anyway: never.
_SKIP_FOREVER = 2**30


class Adam:
    """Kingma & Ba 2015; the Deletang et al. 2023 optimizer."""

    DEFAULTS = {"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8}

    @staticmethod
    def make(cfg, lr) -> optax.GradientTransformation:
        return _injected(optax.adam, lr, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"])


class AdamW:
    """Loshchilov & Hutter 2019 (decoupled weight decay)."""

    DEFAULTS = {"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01}

    @staticmethod
    def make(cfg, lr) -> optax.GradientTransformation:
        return _injected(
            optax.adamw,
            lr,
            b1=cfg["b1"],
            b2=cfg["b2"],
            eps=cfg["eps"],
            weight_decay=cfg["weight_decay"],
        )


class SGD:
    DEFAULTS = {"lr": 0.1, "momentum": 0.9, "nesterov": False}

    @staticmethod
    def make(cfg, lr) -> optax.GradientTransformation:
        return _injected(optax.sgd, lr, momentum=cfg["momentum"] or None, nesterov=cfg["nesterov"])


def _injected(optimizer, lr, **static) -> optax.GradientTransformation:
    """`optimizer(learning_rate=lr, **static)` with only the learning rate injected: the other
    hyperparameters stay Python numbers, so the update is the plain optimizer's bit for bit."""
    static_args = tuple(p for p in inspect.signature(optimizer).parameters if p != "learning_rate")
    return optax.inject_hyperparams(optimizer, static_args=static_args)(learning_rate=lr, **static)


def _with_warmup(lr: float, warmup: int, after: optax.Schedule) -> optax.Schedule:
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


class Constant:
    DEFAULTS = {"warmup": 0}

    @staticmethod
    def make(cfg, lr: float, steps: int) -> optax.Schedule:
        return _with_warmup(lr, cfg["warmup"], optax.constant_schedule(lr))


class Cosine:
    """Linear warmup, then cosine decay to min_ratio * lr at the last step."""

    DEFAULTS = {"warmup": 0, "min_ratio": 0.0}

    @staticmethod
    def make(cfg, lr: float, steps: int) -> optax.Schedule:
        warmup = cfg["warmup"]
        if warmup <= 0:
            return optax.cosine_decay_schedule(lr, max(1, steps), cfg["min_ratio"])
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(steps, warmup + 1), lr * cfg["min_ratio"]
        )


class Linear:
    """Linear warmup, then linear decay to min_ratio * lr at the last step."""

    DEFAULTS = {"warmup": 0, "min_ratio": 0.0}

    @staticmethod
    def make(cfg, lr: float, steps: int) -> optax.Schedule:
        decay = max(1, steps - cfg["warmup"])
        decayed = optax.linear_schedule(lr, lr * cfg["min_ratio"], decay)
        return _with_warmup(lr, cfg["warmup"], decayed)


class Rsqrt:
    """Linear warmup, then lr * sqrt(warmup / step) (Vaswani et al. 2017)."""

    DEFAULTS = {"warmup": 1000}

    @staticmethod
    def make(cfg, lr: float, steps: int) -> optax.Schedule:
        w = max(1, cfg["warmup"])
        decayed = lambda s: lr * jnp.sqrt(w / jnp.maximum(s + w, 1))
        return _with_warmup(lr, cfg["warmup"], decayed)


OPTIMIZERS = {"adam": Adam, "adamw": AdamW, "sgd": SGD}
SCHEDULES = {"constant": Constant, "cosine": Cosine, "linear": Linear, "rsqrt": Rsqrt}


def make_schedule(config) -> optax.Schedule:
    s = config.train.schedule
    cls = lookup(SCHEDULES, s.name, "train.schedule.name")
    return cls.make(s, config.train.optimizer.lr, config.train.steps)


def make_optimizer(config) -> optax.GradientTransformation:
    """Clipping, then the optimizer with the scheduled (injected) learning rate."""
    o = config.train.optimizer
    tx = lookup(OPTIMIZERS, o.name, "train.optimizer.name").make(o, make_schedule(config))
    if config.train.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.train.grad_clip), tx)
    if config.train.skip_nonfinite:
        tx = optax.apply_if_finite(tx, _SKIP_FOREVER)
    return tx


def learning_rate(opt_state):
    """The learning rate of the last update (what inject_hyperparams recorded)."""
    return optax.tree_utils.tree_get(
        opt_state, "learning_rate", filtering=lambda _, v: isinstance(v, jax.Array)
    )


def skipped_updates(opt_state):
    """Updates apply_if_finite skipped so far (0 without train.skip_nonfinite)."""
    total = optax.tree_utils.tree_get(opt_state, "total_notfinite")
    return jnp.zeros((), jnp.int32) if total is None else total
