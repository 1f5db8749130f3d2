"""Stopping a diverged run: the non-finite checks of the training loop (slora.train.loop).

    check_finite(step, loss, norm, cfg)   after every optimizer step (--check-finite step, the default): the host
                                           reads loss and gradient norm and raises NonFiniteError naming the step
    DeviceFiniteCheck                      --check-finite log: the same check kept on the device, read where the loop
                                           syncs anyway (log steps, before a checkpoint, before evaluation)
    skip_flag(norm)                        --fused-optim: the fused AdamW's found_inf, so a non-finite step's update
                                           is skipped on the device

A diverged run saves no adapter and is no resume point (finetune keeps no in-progress folder for NonFiniteError).
"""
from __future__ import annotations

import math

import torch

from slora.dist import process_group


class NonFiniteError(FloatingPointError):
    """Training diverged: a loss or gradient norm is NaN or infinite."""


def check_finite(step: int, loss: float, norm: float, cfg):
    if math.isfinite(loss) and math.isfinite(norm):
        return
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
    raise NonFiniteError(
        f"step {step}: {what} is not finite; training stopped and no adapter was saved. Likely causes: the "
        f"learning rate is too high (--lr {cfg.lr:g}), a bad training example, or fp16/bf16 overflow "
        f"(try --precision fp32)")


class DeviceFiniteCheck:
    """`--check-finite log`: the non-finite check of every optimizer step, kept on the device and read at sync points.

    The default (`--check-finite step`) reads each step's loss and gradient norm on the host (`.item()`), and on a
    GPU each read waits until the device has drained its queue, a stall per step that small models feel most. Here
    `record` keeps, on the device, the first step whose loss or norm is not finite with those two values (a few
    0-d tensor ops, no host read), and `raise_if_bad` reads them, one host read, where the loop syncs anyway: at a
    log step, before a checkpoint is written, before evaluation. It raises the same NonFiniteError, naming the
    exact first bad step. The steps between that step and the sync point only change a run that is about to stop:
    no checkpoint, evaluation or adapter is made from them. (With --fused-optim such a step's update is skipped on
    the device too; see `skip_flag`.)"""

    def __init__(self):
        self.state = None  # (step, loss, norm) on the device: step 0 while every step so far was finite

    def record(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        if self.state is None:
            z = torch.zeros((), device=loss.device)
            self.state = (torch.zeros((), dtype=torch.long, device=loss.device), z, z)
        first, lo, no = self.state
        new = ~(torch.isfinite(loss) & torch.isfinite(norm)) & (first == 0)  # () bool: the first bad step
        self.state = (torch.where(new, step, first), torch.where(new, loss.float(), lo),
                      torch.where(new, norm.float(), no))

    def raise_if_bad(self, cfg) -> None:
        """NonFiniteError for the first bad step of any rank (torchrun: a collective, every rank calls it)."""
        if self.state is None:
            return
        mine = torch.stack([t.double() for t in self.state]).tolist()  # [step, loss, norm]: one host read
        bad = [r for r in process_group.all_gather_json(mine) if r[0]]  # each rank's loss is its own part of the loss
        if bad:
            step, loss, norm = min(bad, key=lambda r: r[0])
            check_finite(int(step), loss, norm, cfg)


def skip_flag(norm: torch.Tensor) -> torch.Tensor:
    """Fused AdamW's `found_inf` for a step: 1.0 when the gradient norm is not finite, and then the fused kernel
    leaves parameters and moments as they were and takes the step back from its count (the mechanism
    torch.amp.GradScaler uses). The norm, not the loss: under DDP it is the same number on every rank (computed
    from the all-reduced gradients), so all ranks skip together and the replicas stay equal."""
    return (~torch.isfinite(norm)).float()
