"""The one training loop: AdamW with a one-cycle schedule over seeded shuffled batches.

The zoo trainer (:func:`audit.zoo.train.train_model`) and the world encoder
(:func:`audit.embed.world_encoder.train_world_encoder`) differ only in how they compute
the loss of a batch; everything else (optimiser, schedule, the permutation per epoch,
the backward step, the progress bar) lives here, so both are deterministic for a seed
in the same way.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def train_loop(
    params: Iterable[Any],
    step_loss: Callable[[Any, Any], Any],
    *,
    n: int,
    batch_size: int,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    pct_start: float = 0.1,
    seed: int = 0,
    drop_last: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Minimise ``step_loss`` over ``epochs`` passes of ``n`` rows; returns the mean loss per epoch.

    ``step_loss(idx, gen)`` gets a LongTensor ``[B]`` of row indices (a slice of this
    epoch's permutation) and the loop's seeded ``torch.Generator`` (for augmentation), and
    returns the batch's scalar loss tensor. Every epoch draws one permutation of ``range(n)``
    from that generator; with ``drop_last`` the incomplete last batch is skipped (at least
    one batch per epoch is kept). ``batch_size`` larger than ``n`` means one batch of all rows.
    The caller puts its modules in train/eval mode; the loop only steps ``params``.
    """
    import torch
    from tqdm.auto import tqdm

    if n < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(
            f"train_loop needs n, batch_size and epochs >= 1; got n={n}, batch_size={batch_size}, epochs={epochs}"
        )
    bs = min(int(batch_size), int(n))
    starts = list(range(0, n - bs + 1, bs)) if drop_last else list(range(0, n, bs))
    steps = epochs * len(starts)
    opt = torch.optim.AdamW(params, lr=float(lr), weight_decay=float(weight_decay))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=float(lr), total_steps=steps, pct_start=float(pct_start)
    )
    gen = torch.Generator().manual_seed(int(seed))
    losses = []
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for i in starts:
                loss = step_loss(perm[i : i + bs], gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total = total + loss.detach()  # summed on the device: no sync per step
                bar.update(1)
                if progress:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            losses.append(float(total) / len(starts))
    return losses


def channels_last(x):
    """A module or a 4-D batch in channels-last memory order, where oneDNN's (and cuDNN's
    mixed-precision) convolutions run fastest: measured 15-30% less time per training step
    for the demo's ResNets and DenseNets on one CPU core, nothing lost for the others (a
    module's parameters of other ranks and batches that are not 4-D are left as they are)."""
    import torch

    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def usable_cores() -> int:
    """CPU cores this process may run on (respects taskset and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


_threads_lock = threading.Lock()
_threads_held = [0, 0]  # blocks inside torch_threads now, torch's thread count before the first


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: leave the setting as is),
    then restore the previous setting. The setting is the whole process's: blocks on several
    Python threads (an in-process executor training two models) count themselves in and the
    last one out restores it, so none of them runs with another's count restored under it
    (channels-last kernels give other weights on another thread count)."""
    if threads is None:
        yield
        return
    import torch

    if int(threads) < 1:
        raise ValueError(
            f"threads must be a positive number of torch intra-op threads, or None; got {threads}"
        )
    with _threads_lock:
        if _threads_held[0] == 0:
            _threads_held[1] = torch.get_num_threads()
        _threads_held[0] += 1
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        with _threads_lock:
            _threads_held[0] -= 1
            if _threads_held[0] == 0:
                torch.set_num_threads(_threads_held[1])
