"""Training configuration: every knob of a run in one JSON-serialisable dataclass (saved in each checkpoint).

Defaults follow docs/method.md: DINO's ViT-S/16 recipe plus ADCLR's query settings, each configurable.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidSettingError
from ..queries import QUERY_ATTENDS, QUERY_POS

VARIANTS = ("dino", "ibot")
#: How the teacher's logits become targets: DINO's running center, or a Sinkhorn-Knopp balance of the batch.
CENTERINGS = ("center", "sinkhorn_knopp")

#: Named recipes that replace some of TrainConfig's defaults (DINO's ViT-S/16 ImageNet recipe).
#: `small`: a few thousand images and a few hundred steps (the Fashion-MNIST study, the demo model). With DINO's
#: teacher temperatures (0.04 -> 0.07) a small ViT's [CLS] outputs differ too little between images at the start
#: (centred logits spread ~0.045, views of one image agree at cosine ~0.28), so the centred teacher is uniform and the
#: [CLS] loss sits at ln K for the whole run; a fixed 0.02 makes the teacher sharp from step one. A running center then
#: lets a batch of 64 fall onto a handful of prototypes within ~30 steps and drift back to uniform (benchmarks/
#: RESULTS.md), so the batch is balanced by Sinkhorn-Knopp over 128 prototypes (fewer than its 128 teacher rows, so rows
#: can still be sharp). No frozen last layer (an epoch is a large share of such a run), a teacher that follows faster,
#: a 1-epoch warm-up and a constant weight decay (DINO's 0.04 -> 0.4 ramp is laid out for hundreds of epochs). The
#: teacher momentum stays at 0.99 and the lr at its batch-64 peak to the end: with DINO's cosines (momentum -> 1, lr ->
#: 1e-6) the teacher stops following from about two thirds of a 1250-step run, and its k-NN stops rising with it.
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(warmup_teacher_temp=0.02, teacher_temp=0.02, warmup_teacher_temp_epochs=0, freeze_last_layer=0,
                  momentum_teacher=0.99, momentum_teacher_end=0.99, centering="sinkhorn_knopp", out_dim=128,
                  head_hidden_dim=1024, head_bottleneck_dim=256, lr=2e-3, min_lr=5e-4, warmup_epochs=1,
                  weight_decay=0.04, weight_decay_end=0.04),
}


@dataclass
class TrainConfig:
    data: str = ""
    output: str = "runs/adclr"
    arch: str = "adclr_vit_small"
    img_size: int = 224
    model_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": 'extra timm.create_model arguments, e.g. \'{"depth": 6, "patch_size": 8}\''})
    variant: str = "dino"
    # ADCLR queries
    num_queries: int = 10
    query_size: int | None = field(default=None, metadata={   # None: the backbone's patch size (one token per query)
        "type": int, "help": "query crop size in pixels (default: the patch size)"})
    query_scale: tuple[float, float] = (0.05, 0.25)
    query_attends: str = "self"
    query_pos: str = "none"
    local_queries: bool = False            # also append the queries to the student's local crops
    lambda_q: float = 1.0
    bidirectional_ablation: bool = False   # image tokens read queries too: a known collapse route, ablation only
    # iBOT variant
    lambda_patch: float = 1.0
    koleo_weight: float = field(default=0.0, metadata={
        "help": "weight of DINOv2's KoLeo term on the student's global [CLS] embeddings (0: off; DINOv2 uses 0.1)"})
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    centering: str = field(default="center", metadata={
        "choices": CENTERINGS,
        "help": "teacher targets: DINO's running center, or a Sinkhorn-Knopp balance of each batch over the "
                "prototypes (DINOv2's option)"})
    # multi-crop
    local_crops: int = 8
    local_size: int = 96
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    # head and loss
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    norm_last_layer: bool = True
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    # optimisation
    epochs: int = 100
    batch_size: int = 64                   # per process
    lr: float = 5e-4                       # at batch 256 (scaled linearly with the global batch)
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = field(default=1.0, metadata={
        "help": "teacher momentum at the end of its cosine (1: the teacher freezes as training ends, DINO's choice "
                "for long runs)"})
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    drop_path: float = 0.1
    precision: str = "auto"                # auto: bf16 on CUDA when supported, else fp16 with a scaler; fp32 on CPU
    # run
    seed: int = 0
    workers: int = 4
    save_every: int = 1
    log_every: int = 10

    def __post_init__(self) -> None:
        self.query_scale = tuple(self.query_scale)
        self.global_scale = tuple(self.global_scale)
        self.local_scale = tuple(self.local_scale)
        self.mask_ratio = tuple(self.mask_ratio)
        checks = [
            (self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}"),
            (self.query_attends in QUERY_ATTENDS,
             f"query_attends must be one of {QUERY_ATTENDS}, got {self.query_attends!r}"),
            (self.query_pos in QUERY_POS, f"query_pos must be one of {QUERY_POS}, got {self.query_pos!r}"),
            (self.num_queries >= 0, f"num_queries must be >= 0, got {self.num_queries}"),
            (self.centering in CENTERINGS, f"centering must be one of {CENTERINGS}, got {self.centering!r}"),
            (self.koleo_weight >= 0, f"koleo_weight must be >= 0, got {self.koleo_weight}"),
            (self.local_crops >= 0, f"local_crops must be >= 0, got {self.local_crops}"),
            (self.epochs > 0 and self.batch_size > 0, "epochs and batch_size must be positive"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"),
             f"precision must be auto|fp32|bf16|fp16, got {self.precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidSettingError(f"TrainConfig: {message}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """A named recipe from `PRESETS`, with `overrides` on top."""
        if name not in PRESETS:
            raise InvalidSettingError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidSettingError(f"TrainConfig: unknown setting(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)
