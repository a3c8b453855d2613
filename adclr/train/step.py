"""One ADCLR training step's math, apart from the loop: student and teacher forward, the loss, backward, EMA.

`TrainStep` holds the networks, the loss and the query settings; the loop (`engine.Trainer`) owns the optimizer,
the schedules, the data and the checkpoints. Benchmarks time this step directly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from timm.data import resolve_model_data_config
from torch import Tensor, nn

from ..errors import InvalidSettingError, NonFiniteLossError
from .config import TrainConfig
from .data import normalize_uint8
from .koleo import koleo_over_views
from .losses import ADCLRLoss
from .network import SSLNetwork


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed) for ``cfg.precision`` on ``device``."""
    choice = cfg.precision
    if device.type != "cuda":
        if choice in ("bf16", "fp16"):
            raise InvalidSettingError(f"precision {choice} needs a CUDA device; on CPU use --precision fp32 (or auto).")
        return None, False
    if choice == "auto":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice], choice == "fp16"


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


class TrainStep:
    """Student (possibly DDP-wrapped for the forward), EMA teacher, `ADCLRLoss`, the query settings and precision."""

    def __init__(self, cfg: TrainConfig, student: SSLNetwork, teacher: SSLNetwork, loss: ADCLRLoss,
                 device: torch.device, student_ddp: nn.Module | None = None) -> None:
        self.student, self.teacher, self.loss, self.device = student, teacher, loss, device
        self.student_ddp = student_ddp or student
        self.num_queries, self.query_attends, self.query_pos = cfg.num_queries, cfg.query_attends, cfg.query_pos
        self.bidirectional_ablation, self.local_queries = cfg.bidirectional_ablation, cfg.local_queries
        self.koleo_weight = cfg.koleo_weight
        data_cfg = resolve_model_data_config(student.backbone)
        self.mean, self.std = data_cfg["mean"], data_cfg["std"]
        self.autocast_dtype, needs_scaler = resolve_precision(cfg, device)
        self.scaler = torch.amp.GradScaler("cuda") if needs_scaler else None

    def _queries(self) -> dict:
        return dict(query_attends=self.query_attends, query_pos=self.query_pos,
                    bidirectional_ablation=self.bidirectional_ablation)

    def _images(self, images: Tensor) -> Tensor:
        """Views to the device; uint8 views (the engine's data workers send those: a quarter of the bytes) are
        normalised there with the backbone's mean and std, float views are taken as normalised already."""
        images = images.to(self.device, non_blocking=True)
        return normalize_uint8(images, self.mean, self.std) if images.dtype == torch.uint8 else images

    def forward_backward(self, batch: dict, teacher_temp: float) -> dict[str, Tensor]:
        """Forward both networks on a collated batch, compute the loss terms and backpropagate the total (scaled when
        fp16); -> the terms. Raises `NonFiniteLossError` (on every rank) before any gradient is written."""
        globals_ = [self._images(v) for v in batch["global"]]
        locals_ = [self._images(v) for v in batch["local"]]
        queries = self._images(batch["queries"]) if self.num_queries else None
        masks = [m.to(self.device, non_blocking=True) for m in batch["masks"]] if "masks" in batch else None
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        # Both heads stop at their bottleneck: the loss applies the last layer block by block of rows, so no
        # full-size head output (B x r x K per view for the queries) is made (`ADCLRLoss.fused`).
        with autocast:
            with torch.no_grad():
                teacher = self.teacher(globals_, queries, patch_outputs=masks is not None, last_layer=False,
                                       **self._queries())
            student = self.student_ddp(globals_, queries, locals_, masks=masks, local_queries=self.local_queries,
                                       patch_outputs=masks is not None, last_layer=False, **self._queries())
            terms = self.loss.from_outputs(student, teacher, teacher_temp, masks)
            del teacher
            if self.koleo_weight:
                terms["koleo"] = koleo_over_views(student["embedding"])
                terms["loss"] = terms["loss"] + self.koleo_weight * terms["koleo"]
            del student  # the backward needs none of it: the fused loss made its gradients, the weight (64 MiB) can go
        loss = terms["loss"]
        finite = torch.isfinite(loss.detach()).float()
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            error = NonFiniteLossError(f"loss is {float(loss.detach())}")
            error.terms = {k: float(v.detach()) for k, v in terms.items()}
            raise error
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return terms

    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        ema_update(self.teacher, self.student, momentum)
