"""How a task's examples become model batches: the three layouts and the length buckets.

Layouts (all numpy, batch-major, pad id 0 on the right, T padded to `bucket_length`):
  "encoder"  (Deletang et al. 2023 transduction): inputs = task input + |y| BLANKs; targets
             hold y at the last |y| real positions; loss_mask = the task's output mask there.
  "decoder"  (Kazemnejad et al. 2023 prompt + answer; and language modelling):
             seq = input + SEP + output + EOS, inputs = seq[:-1], targets = seq[1:]; loss on
             the answer tokens (output mask applied) and on the EOS that ends it. For text
             tasks seq is a window of the corpus and every token is scored (`format_lm`).
  "seq2seq"  src = task input (padded to bucket_length(|x|)), inputs = BOS + output[:-1],
             targets = output, loss_mask = output mask; adds "src" and "src_mask".
Keys: inputs/targets int32 BT, loss_mask float32 BT, token_mask bool BT (True on real tokens),
and "positions" (int32 BT) when the task supplies position ids (`format_rows`).

Length buckets: T is rounded up to the next of 16, 24, 32, 48, 64, 96, 128, 192, ...
(powers of two and 1.5x powers of two, all multiples of 8), so padding wastes at most a third
of a batch and the Deletang range n = 1..40 (T up to 81 in the encoder layout, 121 for
duplicate_string) compiles at most 7 shapes. Training batches cut the bucket at the longest
real length the run trains on (`Task.train_cap`): parity_check at n = 40 trains at T = 41,
not 48 (README Performance has the speed-up). `padded_length(task, layout, n, train)` is the
one function that says how long a batch of nominal length n is.
"""

import numpy as np

from attn.registry import ConfigError

# Special ids, shared by every task and layout; task symbols start at NUM_SPECIAL.
PAD, BOS, SEP, BLANK = 0, 1, 2, 3
EOS = SEP
NUM_SPECIAL = 4

LAYOUTS = ("encoder", "decoder", "seq2seq")
MIN_BUCKET = 16


def bucket_length(n: int, cap: int | None = None) -> int:
    """Padded length for a sequence of n real tokens (>= n, from a short geometric grid).

    cap: the longest real length the run trains on (`Task.train_cap`); a bucket above it is
    cut to it, so the training batches of the longest lengths carry no padding (n = 40 in the
    encoder layout: T = 41, not 48). Lengths above the cap get their plain bucket."""
    if n <= MIN_BUCKET:
        b = MIN_BUCKET
    else:
        p = 1 << (int(n) - 1).bit_length()  # next power of two >= n
        b = 3 * p // 4 if 3 * p // 4 >= n else p
    return cap if cap is not None and n <= cap < b else b


def format_batch(x_BN, y_BM, mask_BM, layout: str, cap: int | None = None) -> dict:
    """Lay out token ids (already shifted by NUM_SPECIAL) of one nominal length; `cap` as
    in `bucket_length` (the encoder and decoder layouts; seq2seq pads to plain buckets)."""
    b, n = x_BN.shape
    m = y_BM.shape[1]
    mask = mask_BM.astype(np.float32)
    if layout == "seq2seq":
        s, t = bucket_length(n), bucket_length(m)
        src = np.zeros((b, s), np.int32)
        src[:, :n] = x_BN
        inputs = np.zeros((b, t), np.int32)
        inputs[:, 0] = BOS
        inputs[:, 1:m] = y_BM[:, :-1]
        targets = np.zeros((b, t), np.int32)
        targets[:, :m] = y_BM
        loss = np.zeros((b, t), np.float32)
        loss[:, :m] = mask
        return {
            "inputs": inputs,
            "targets": targets,
            "loss_mask": loss,
            "token_mask": np.arange(t)[None, :].repeat(b, 0) < m,
            "src": src,
            "src_mask": np.arange(s)[None, :].repeat(b, 0) < n,
        }
    if layout == "encoder":
        real = n + m
        t = bucket_length(real, cap)
        inputs = np.zeros((b, t), np.int32)
        inputs[:, :n] = x_BN
        inputs[:, n:real] = BLANK
        targets = np.zeros((b, t), np.int32)
        targets[:, n:real] = y_BM
        loss = np.zeros((b, t), np.float32)
        loss[:, n:real] = mask
    elif layout == "decoder":
        real = n + m + 1  # len(x + SEP + y + EOS) - 1
        t = bucket_length(real, cap)
        inputs = np.zeros((b, t), np.int32)
        inputs[:, :n] = x_BN
        inputs[:, n] = SEP
        inputs[:, n + 1 : real] = y_BM
        targets = np.zeros((b, t), np.int32)
        targets[:, : n - 1] = x_BN[:, 1:]
        targets[:, n - 1] = SEP
        targets[:, n : n + m] = y_BM
        targets[:, n + m] = EOS
        loss = np.zeros((b, t), np.float32)
        loss[:, n : n + m] = mask
        loss[:, n + m] = 1.0
    else:
        raise ConfigError(f"layout: unknown {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss,
        "token_mask": np.arange(t)[None, :].repeat(b, 0) < real,
    }


def format_rows(x_rows, y_rows, layout: str, *, positions=None, cap=None) -> dict[str, np.ndarray]:
    """Lay out rows of different lengths (ids already shifted by NUM_SPECIAL), each as
    `format_batch` lays out one row with every output token scored, right padded to the
    bucket of the longest row.

    positions: None, or per row the task's position ids (experiments/tasks/base.py
    `RaggedTask.row_positions`) as (x_ids, sep_id, y_ids); they become the batch's
    "positions" (int32 BT, 0 on padding): x + SEP + y for the decoder (its inputs), x + y for
    the encoder (the answer slots take y's ids). The seq2seq layout takes no positions.
    cap: as in `bucket_length` (encoder and decoder layouts).
    """
    b = len(x_rows)
    n = np.array([len(x) for x in x_rows])
    m = np.array([len(y) for y in y_rows])
    if layout == "seq2seq":
        if positions is not None:
            raise ConfigError("layout: task positions need the decoder or encoder layout")
        s, t = bucket_length(int(n.max())), bucket_length(int(m.max()))
        out = {
            "inputs": np.zeros((b, t), np.int32),
            "targets": np.zeros((b, t), np.int32),
            "loss_mask": np.zeros((b, t), np.float32),
            "token_mask": np.arange(t)[None, :] < m[:, None],
            "src": np.zeros((b, s), np.int32),
            "src_mask": np.arange(s)[None, :] < n[:, None],
        }
        for i, (x, y) in enumerate(zip(x_rows, y_rows, strict=True)):
            out["src"][i, : n[i]] = x
            out["inputs"][i, 0] = BOS
            out["inputs"][i, 1 : m[i]] = y[:-1]
            out["targets"][i, : m[i]] = y
            out["loss_mask"][i, : m[i]] = 1.0
        return out
    if layout not in ("encoder", "decoder"):
        raise ConfigError(f"layout: unknown {layout!r}; allowed: {', '.join(LAYOUTS)}")
    decoder = layout == "decoder"
    real = n + m + (1 if decoder else 0)
    t = bucket_length(int(real.max()), cap)
    inputs = np.zeros((b, t), np.int32)
    targets = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), np.float32)
    pos = None if positions is None else np.zeros((b, t), np.int32)
    for i, (x, y) in enumerate(zip(x_rows, y_rows, strict=True)):
        ni, mi = n[i], m[i]
        inputs[i, :ni] = x
        if decoder:
            inputs[i, ni] = SEP
            inputs[i, ni + 1 : ni + mi + 1] = y
            targets[i, : ni - 1] = x[1:]
            targets[i, ni - 1] = SEP
            targets[i, ni : ni + mi] = y
            targets[i, ni + mi] = EOS
            loss[i, ni : ni + mi + 1] = 1.0
        else:
            inputs[i, ni : ni + mi] = BLANK
            targets[i, ni : ni + mi] = y
            loss[i, ni : ni + mi] = 1.0
        if pos is not None:
            px, psep, py = positions[i]
            row = [*px, psep, *py] if decoder else [*px, *py]
            pos[i, : len(row)] = row
    out = {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss,
        "token_mask": np.arange(t)[None, :] < real[:, None],
    }
    if pos is not None:
        out["positions"] = pos
    return out


def format_lm(tokens_BL1) -> dict[str, np.ndarray]:
    """Decoder layout of corpus windows of L + 1 tokens: every next token is scored."""
    b, l1 = tokens_BL1.shape
    real = l1 - 1
    t = bucket_length(real)
    inputs = np.zeros((b, t), np.int32)
    targets = np.zeros((b, t), np.int32)
    inputs[:, :real] = tokens_BL1[:, :-1]
    targets[:, :real] = tokens_BL1[:, 1:]
    valid = np.arange(t)[None, :].repeat(b, 0) < real
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": valid.astype(np.float32),
        "token_mask": valid,
    }


def check_layout(task, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout: unknown {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if layout not in task.layouts:
        allowed = ", ".join(task.layouts)
        raise ConfigError(f"layout: {layout!r} does not fit task {task.name!r}; allowed: {allowed}")


def padded_length(task, layout: str, n: int, train: bool = False) -> int:
    """Padded length T of a batch of nominal length n (what positions must cover); train: of
    a training batch (cut at the task's `train_cap`)."""
    cap = task.train_cap(layout) if train else None
    return bucket_length(task.sequence_length(n, layout), cap)
