"""The training loop: EMA teacher, per-iteration schedules, mixed precision, checkpoints, resume, DDP.

One step: the teacher sees the two global views (with the query tokens), the student sees every crop (queries on the
globals, iBOT masks in that variant), `ADCLRLoss` compares them, AdamW updates the student, the teacher follows by EMA.
Launch several processes with `torchrun`; each reads RANK / WORLD_SIZE / LOCAL_RANK from the environment.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..errors import InvalidSettingError, NonFiniteLossError
from ..images import ImageFolder
from ..load import read_training_checkpoint
from .checkpoint import CHECKPOINT_NAME, capture_rng, remove_stale_temporaries, restore_rng, save_atomic
from .config import TrainConfig
from .data import MultiCropAugmentation, collate_multicrop
from .heads import cancel_last_layer_gradients
from .diagnostics import REMEDIES, collapse_state, read_back
from .losses import ADCLRLoss
from .metrics_log import append_record, keep_completed_epochs
from .ibot_masks import GlobalViewMasks
from .network import SSLNetwork, build_network
from .schedules import cosine_schedule, teacher_temp_schedule
from .step import TrainStep

_logger = logging.getLogger(__name__)

#: Settings that may change between an interrupted run and its resumption. The run's length may change too (epochs,
#: batch size, and outside the config the processes and the images): the schedules are laid out for the run as it is
#: now and resumed at its progress in whole epochs, as DINO does.
RESUMABLE_CHANGES = {"data", "output", "workers", "log_every", "save_every", "epochs", "batch_size"}


def param_groups(module: torch.nn.Module) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only, never on biases or 1-D parameters (norms, scales)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def _distributed() -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on GPU); (0, 1, device) when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    defaults = TrainConfig().to_dict()  # a setting newer than the checkpoint had its default there
    changed = {}
    for key, now in cfg.to_dict().items():
        before = saved.get(key, defaults[key])
        if key not in RESUMABLE_CHANGES and json.dumps(before) != json.dumps(now):
            changed[key] = (before, now)
    if changed:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
        raise InvalidSettingError(f"--resume with settings that differ from the checkpoint's ({detail}); resume with "
                                  "the original settings or start a new --output.")


def _run_length_changes(checkpoint: dict, cfg: TrainConfig, world: int, images: int, steps_per_epoch: int) -> list[str]:
    """'what: checkpoint -> now' for each change that moves the schedules (older checkpoints lack some fields)."""
    saved, done = checkpoint["config"], checkpoint["epoch"]
    before = {"epochs": saved["epochs"], "batch size per process": saved["batch_size"],
              "processes": checkpoint.get("world"), "images": checkpoint.get("images"),
              "steps per epoch": checkpoint["step"] // done}
    now = {"epochs": cfg.epochs, "batch size per process": cfg.batch_size, "processes": world, "images": images,
           "steps per epoch": steps_per_epoch}
    return [f"{k}: {before[k]} -> {now[k]}" for k in now if before[k] is not None and before[k] != now[k]]


class Trainer:
    """Holds one run's state; `fit()` trains until `cfg.epochs` (or `until_epoch`) and returns the teacher."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.rank, self.world, self.device = _distributed()
        self.output = Path(cfg.output)
        self.is_main = self.rank == 0
        _seed_everything(cfg.seed)

        self.student = build_network(cfg, drop_path=cfg.drop_path).to(self.device)
        self.teacher = build_network(cfg).to(self.device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.student_ddp = (DistributedDataParallel(self.student, device_ids=[self.device] if self.device.type == "cuda"
                                                    else None) if self.world > 1 else self.student)
        self.loss = ADCLRLoss(cfg.out_dim, lambda_q=cfg.lambda_q,
                              lambda_patch=cfg.lambda_patch if cfg.variant == "ibot" else 0.0,
                              student_temp=cfg.student_temp, centering=cfg.centering).to(self.device)
        self.step_fn = TrainStep(cfg, self.student, self.teacher, self.loss, self.device, self.student_ddp)
        self.scaler = self.step_fn.scaler
        self.optimizer = torch.optim.AdamW(param_groups(self.student))

        self.dataset, self.sampler, self.loader = self._data()
        iters = len(self.loader)
        batch = cfg.batch_size * self.world
        self.lr = cosine_schedule(cfg.lr * batch / 256, cfg.min_lr, cfg.epochs, iters, cfg.warmup_epochs)
        self.wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, iters)
        self.momentum = cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, iters)
        self.teacher_temp = teacher_temp_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                                  cfg.warmup_teacher_temp_epochs, cfg.epochs, iters)
        self.epoch, self.step = 0, 0
        self._warned: set[str] = set()  # loss terms already reported as collapsed
        if resume:
            self._resume()

    def _data(self):
        cfg = self.cfg
        patch = self.student.backbone.patch_embed.patch_size[0]
        transform = MultiCropAugmentation(  # the step's mean and std: the ones it normalises the uint8 views with
            global_size=cfg.img_size, local_size=cfg.local_size, num_local=cfg.local_crops,
            global_scale=cfg.global_scale, local_scale=cfg.local_scale, mean=self.step_fn.mean, std=self.step_fn.std,
            num_queries=cfg.num_queries, query_size=cfg.query_size or patch, query_scale=cfg.query_scale,
            normalize=False)  # uint8 views; TrainStep normalises them on the device
        dataset = ImageFolder(cfg.data, transform=transform)
        dropped = dataset.verify()
        if dropped and self.is_main:
            _logger.warning("skipped %d unreadable image(s) under %s", dropped, cfg.data)
        if len(dataset) < cfg.batch_size * self.world:
            raise InvalidSettingError(f"{cfg.data} has {len(dataset)} readable images, fewer than one global batch "
                                      f"({cfg.batch_size} x {self.world} processes); lower --batch-size or add images.")
        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        masks = None
        if cfg.variant == "ibot":
            masks = GlobalViewMasks((cfg.img_size // patch, cfg.img_size // patch), cfg.mask_ratio,
                                    cfg.mask_probability)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                            collate_fn=functools.partial(collate_multicrop, masks=masks), drop_last=True,
                            pin_memory=self.device.type == "cuda",
                            persistent_workers=cfg.workers > 0)  # no fork and re-fill of the workers every epoch
        return dataset, sampler, loader

    def _resume(self) -> None:
        checkpoint = read_training_checkpoint(self.output / CHECKPOINT_NAME)
        _check_resumable(checkpoint["config"], self.cfg)
        done = checkpoint["epoch"]
        if self.cfg.epochs < done:
            raise InvalidSettingError(f"--epochs {self.cfg.epochs} is fewer than the {done} epochs the checkpoint in "
                                      f"{self.output} has done; resume with --epochs {done} or more, or export it as "
                                      "it is (adclr export).")
        self.student.load_state_dict(checkpoint["student"])
        self.teacher.load_state_dict(checkpoint["teacher"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.loss.load_state_dict(checkpoint["loss"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        # Checkpoints are written at epoch ends, so progress is whole epochs: the step is where this run's schedules
        # stand after `done` epochs, whatever the checkpoint's run length was.
        self.epoch, self.step = done, done * len(self.loader)
        states = checkpoint["rng"] if isinstance(checkpoint["rng"], list) else [checkpoint["rng"]]
        restore_rng(states[self.rank % len(states)])  # a rank the checkpoint lacks shares a stream, as a fresh run does
        if not self.is_main:
            return
        changes = _run_length_changes(checkpoint, self.cfg, self.world, len(self.dataset), len(self.loader))
        if changes:
            _logger.warning("resuming with a different run length (%s): the lr, weight decay, teacher momentum and "
                            "temperature schedules are laid out for %d epochs of %d steps as DINO does and continue at "
                            "step %d", "; ".join(changes), self.cfg.epochs, len(self.loader), self.step)
        _logger.info("resumed from %s at epoch %d, step %d", self.output / CHECKPOINT_NAME, self.epoch, self.step)

    def _save(self) -> None:
        rng = capture_rng()
        if self.world > 1:  # every rank's RNG, so each resumes its own stream
            gathered = [None] * self.world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        if not self.is_main:
            return
        save_atomic({
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "loss": self.loss.state_dict(), "epoch": self.epoch, "step": self.step, "rng": rng,
            "config": self.cfg.to_dict(), "world": self.world, "images": len(self.dataset),
        }, self.output / CHECKPOINT_NAME)

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step at schedule position `self.step`: set lr / weight decay, forward-backward, clip,
        freeze the last head layer in the first epochs, optimizer step, EMA teacher update; -> the logged record."""
        cfg, s = self.cfg, self.step
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[s])
            if group["apply_wd"]:
                group["weight_decay"] = float(self.wd[s])
        self.optimizer.zero_grad(set_to_none=True)
        try:
            terms = self.step_fn.forward_backward(batch, float(self.teacher_temp[s]))
        except NonFiniteLossError as error:
            raise NonFiniteLossError(
                f"{error} at epoch {self.epoch}, step {s} ({error.terms}); "
                f"training stopped and the last good checkpoint {self.output / CHECKPOINT_NAME} was kept. Lower --lr, "
                "lengthen --warmup-epochs, or train with --precision fp32, then --resume.") from None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip_grad)
        if self.epoch < cfg.freeze_last_layer:
            cancel_last_layer_gradients(self.student)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step_fn.update_teacher(float(self.momentum[s]))
        self.step += 1
        return read_back(terms | self.loss.stats()) | {
            "lr": float(self.lr[s]), "wd": float(self.wd[s]), "momentum": float(self.momentum[s]),
            "teacher_temp": float(self.teacher_temp[s])}

    def _log(self, record: dict) -> None:
        if self.is_main:
            append_record(self.output, record)

    def _warn_on_collapse(self, summary: dict) -> None:
        """Once per loss term and run: a teacher still uniform or one-hot after the warm-ups has stopped teaching."""
        if self.epoch < max(self.cfg.warmup_epochs, self.cfg.warmup_teacher_temp_epochs, 1):
            return
        for term in ("cls", "query", "patch"):
            if f"{term}_teacher_entropy" not in summary or term in self._warned:
                continue
            state = collapse_state(summary[f"{term}_teacher_entropy"], summary[f"{term}_batch_entropy"],
                                   self.cfg.out_dim)
            if state:
                self._warned.add(term)
                _logger.warning(
                    "the %s teacher is %s after epoch %d (mean entropy %.2f, batch-mean entropy %.2f, ln K = %.2f): "
                    "the %s loss teaches nothing. Remedies: %s.", term, state, self.epoch,
                    summary[f"{term}_teacher_entropy"], summary[f"{term}_batch_entropy"], math.log(self.cfg.out_dim),
                    term, REMEDIES)

    def fit(self, until_epoch: int | None = None) -> SSLNetwork:
        """Train from the current epoch to `cfg.epochs` (or stop after `until_epoch` epochs, e.g. for a time slot)."""
        cfg = self.cfg
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temporaries(self.output / CHECKPOINT_NAME):
                _logger.info("removed %s, left by a save that was interrupted", stale)
            keep_completed_epochs(self.output, self.epoch)  # the part after the checkpoint is trained again
            (self.output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        last = min(cfg.epochs, until_epoch if until_epoch is not None else cfg.epochs)
        images_per_step = cfg.batch_size * self.world
        for epoch in range(self.epoch, last):
            self.sampler.set_epoch(epoch)
            self.student.train()
            totals: dict[str, float] = {}
            start = time.perf_counter()
            bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.is_main, leave=False)
            for i, batch in enumerate(bar):
                t0 = time.perf_counter()
                record = self.train_step(batch)
                record["images_per_s"] = images_per_step / (time.perf_counter() - t0)
                for k in ("loss", "cls", "query", "patch", *self.loss.stats()):
                    totals[k] = totals.get(k, 0.0) + record[k]
                bar.set_postfix(loss=f"{record['loss']:.4f}", q=f"{record['query']:.4f}",
                                cls_H=f"{record['cls_teacher_entropy'] / math.log(cfg.out_dim):.2f}lnK")
                if i % cfg.log_every == 0:
                    self._log({"epoch": epoch, "step": self.step} | record)
            self.epoch = epoch + 1
            seconds = time.perf_counter() - start
            n = len(self.loader)
            summary = {"epoch_end": self.epoch, "step": self.step, "seconds": round(seconds, 3),
                       "images_per_s": n * images_per_step / seconds} | {k: v / n for k, v in totals.items()}
            self._log(summary)
            if self.is_main:
                _logger.info("epoch %d/%d: %s", self.epoch, cfg.epochs, json.dumps(summary))
                self._warn_on_collapse(summary)
            if self.epoch % cfg.save_every == 0 or self.epoch == last:
                self._save()
        return self.teacher


def train(cfg: TrainConfig, *, resume: bool = False, until_epoch: int | None = None) -> SSLNetwork:
    """Train (or continue, with `resume`) a run and return the teacher network."""
    return Trainer(cfg, resume=resume).fit(until_epoch)
