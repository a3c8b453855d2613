"""ADCLR losses: DINO's [CLS] loss, the query-token loss and iBOT's masked-patch loss.

Each loss is teacher/student self-distillation with a centered, sharpened teacher. Every loss keeps
its own center as a buffer (so `state_dict` and checkpoints hold it) and updates it as an EMA of the
teacher outputs' mean over all processes; with ``centering="sinkhorn_knopp"`` the teacher is balanced over the
prototypes by `sinkhorn.sinkhorn_knopp` instead (DINOv2's option) and the center is not used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import CENTERINGS
from .diagnostics import dot, stats_from_sums, teacher_stats
from .sinkhorn import sinkhorn_knopp


#: Elements per block of rows in the softmaxes over full-size rows (16 MiB in fp32; 64 rows of DINO's 65536
#: prototypes): no full-size temporary is made.
SOFTMAX_BLOCK = 2 ** 22


def _blocks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``t``'s rows (all leading dims folded) in blocks of about `SOFTMAX_BLOCK` elements; views when ``t`` is
    contiguous."""
    rows = t.reshape(-1, t.shape[-1])
    return rows.split(max(1, SOFTMAX_BLOCK // t.shape[-1]))


def _at_least_fp32(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Let CUDA's fp32 matmuls run on TF32 tensor cores while inside (when ``enabled``), then restore the setting."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = previous or enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Elementwise sum; the tensor itself (no copy) when there is one, None when there is none."""
    return functools.reduce(torch.add, tensors) if tensors else None


class _CenteredDistillation(nn.Module):
    """Center buffer, teacher/student distributions and the distributed center EMA shared by all losses."""

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        #: Collapse diagnostics of the last forward (`diagnostics.teacher_stats`, 0-dim tensors); empty before the
        #: first.
        self.stats: dict[str, torch.Tensor] = {}

    def teacher_distribution(self, teacher: torch.Tensor, teacher_temp: float, overwrite: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, the sum of their rows' entropies) of the centered, sharpened teacher; never a gradient path.

        Block by block of rows: a block's logits and log-probabilities exist only while its probabilities and
        entropies are computed, so the probabilities are the one full-size tensor made, and with ``overwrite`` (when
        ``teacher`` has the probabilities' dtype) not even that: they are written over ``teacher``.
        """
        rows = teacher.detach().reshape(-1, self.out_dim)
        dtype = torch.promote_types(rows.dtype, self.center.dtype)
        probs = rows if overwrite and rows.dtype == dtype else torch.empty(rows.shape, dtype=dtype, device=rows.device)
        entropy = rows.new_zeros((), dtype=torch.float32)
        for t, p in zip(_blocks(rows), _blocks(probs)):
            entropy += self.centered_softmax(t, teacher_temp, out=p)
        return probs.reshape(teacher.shape), entropy

    def centered_softmax(self, logits: torch.Tensor, teacher_temp: float, out: torch.Tensor) -> torch.Tensor:
        """Writes one block of rows' centered, sharpened probabilities into ``out`` (which may be ``logits``); -> the
        sum of their entropies, from the log-probabilities (a sharp teacher's probabilities underflow, their log
        does not)."""
        log_probs = F.log_softmax(torch.sub(logits, self.center, out=out).div_(teacher_temp), dim=-1)
        torch.exp(log_probs, out=out)
        return -dot(out.float(), log_probs.float())

    def teacher_distributions(self, teacher_views: Sequence[torch.Tensor], teacher_temp: float,
                              overwrite: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(probabilities per view, (..., K) each like the view; the sum of all rows' entropies). With a center, view by
        view (``overwrite``: over the views, see `teacher_distribution`); with Sinkhorn-Knopp, the rows of every view
        (and process) are balanced together, as DINOv2 balances its crops."""
        if self.centering == "center":
            pairs = [self.teacher_distribution(t, teacher_temp, overwrite) for t in teacher_views]
            return [p for p, _ in pairs], sum(h for _, h in pairs)
        rows = torch.cat([t.reshape(-1, self.out_dim) for t in teacher_views])
        probs = sinkhorn_knopp(rows, teacher_temp).split([t.numel() // self.out_dim for t in teacher_views])
        entropy = -sum(dot(b, b.clamp_min(torch.finfo(b.dtype).tiny).log()) for p in probs for b in _blocks(p))
        return [p.reshape(t.shape) for p, t in zip(probs, teacher_views)], entropy

    def student_log_probs(self, student: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(student / self.student_temp, dim=-1)

    @torch.no_grad()
    def center_sums(self, teacher_out: Sequence[torch.Tensor], prototypes: torch.Tensor | None = None
                    ) -> torch.Tensor | None:
        """(sum of the teacher's rows, row count) in one tensor, for `update_center`; taken before the loss may write
        its probabilities over the teacher's outputs. None without a center. With ``prototypes`` (the last layer's
        (K, C) weight) ``teacher_out`` holds bottleneck features: the logits' sum is their sum times the weight."""
        if self.centering != "center":
            return None
        rows = [t.detach().reshape(-1, t.shape[-1]) for t in teacher_out]  # summed view by view: no copy of all rows
        total = torch.stack([r.sum(0, dtype=self.center.dtype) for r in rows]).sum(0)
        if prototypes is not None:
            total = prototypes.detach().to(total.dtype) @ total
        return torch.cat([total, total.new_tensor([sum(r.shape[0] for r in rows)])])

    @torch.no_grad()
    def update_center(self, stats: torch.Tensor | None) -> None:
        """EMA of the mean teacher output over every row of every process (union of all batches), from `center_sums`.

        Sum and row count are all-reduced together, so unequal per-rank batch sizes still give the
        exact global mean; with no rows anywhere (e.g. r = 0 queries) the center is left unchanged.
        """
        if stats is None:
            return
        if dist.is_initialized():
            dist.all_reduce(stats)
        total, count = stats[:-1], stats[-1]
        updated = self.center * self.center_momentum + total / count.clamp(min=1) * (1 - self.center_momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))

    def _check(self, name: str, tensors: Sequence[torch.Tensor], ndim: int) -> None:
        if len(tensors) == 0:
            raise ValueError(f"{type(self).__name__}: `{name}` is empty; pass one tensor per view.")
        for i, t in enumerate(tensors):
            if t.ndim != ndim or t.shape[-1] != self.out_dim:
                raise ValueError(
                    f"{type(self).__name__}: `{name}[{i}]` has shape {tuple(t.shape)}, expected {ndim} dims ending in "
                    f"out_dim={self.out_dim}; build the loss with the head's out_dim and pass one tensor per view."
                )


def _partners(num_teacher: int, num_student: int) -> list[list[int]]:
    """The teacher views each student view is paired with: every teacher view but its own (the teacher's views are
    the first student views)."""
    partners = [[a for a in range(num_teacher) if a != b] for b in range(num_student)]
    if not any(partners):
        raise ValueError(
            f"no cross-view pair between {num_teacher} teacher view(s) and {num_student} student "
            "view(s); pass at least two views (e.g. the 2 global views to both networks)."
        )
    return partners


def _ce_gradient_(probs: torch.Tensor, targets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """d/d(logits / temp) of ``-targets . log_softmax(logits / temp)`` for one block of rows, from the block's softmax
    (overwritten): ``probs * rowsum(targets) - targets``, into ``out`` (which may be ``probs``)."""
    return torch.sub(probs.mul_(targets.sum(-1, keepdim=True)), targets, out=out)


def _cross_view_ce(teacher_probs: Sequence[torch.Tensor], student_logits: Sequence[torch.Tensor],
                   student_temp: float) -> torch.Tensor:
    """Cross-entropy averaged over rows and over all (teacher view a, student view b) pairs with a != b.

    Views are indexed alike in both lists: the teacher's views are the first student views (the globals). Every view
    has the same rows. Each student view is read once, against the sum of the teacher views it is paired with
    (sum over pairs of q_a . logp_b = sum_b (sum_{a != b} q_a) . logp_b): the work grows with the number of views, not
    pairs, and no full-size product is materialised.
    """
    partners = _partners(len(teacher_probs), len(student_logits))
    with torch.no_grad():  # teacher side only: the sums a student view is paired with
        all_teacher = _sum(teacher_probs) if len(student_logits) > len(teacher_probs) else None
        paired = [_sum([teacher_probs[a] for a in views]) if b < len(teacher_probs) else all_teacher
                  for b, views in enumerate(partners)]
    rows = student_logits[0].numel() // student_logits[0].shape[-1]
    pairs = sum(map(len, partners))
    total = sum(_SoftmaxCrossEntropy.apply(s, q, student_temp) for q, s in zip(paired, student_logits) if q is not None)
    return total / (rows * pairs)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """``-targets . log_softmax(logits / temp)`` summed over all rows, without a full-size temporary.

    Autograd through log_softmax would save the full-size log-probabilities and build three full-size gradients in
    turn (of the product, of log_softmax, of the division). Here both passes run over blocks of rows (`SOFTMAX_BLOCK`
    elements): the forward keeps only the sum, and the backward recomputes each block's softmax from the logits, which
    the network's output dict holds anyway, and finishes the gradient in place:
    d/d logits = (softmax(logits / temp) * rowsum(targets) - targets) / temp. Softmaxes run in fp32 at least, as
    under autocast. (Training uses `_FusedLastLayerCE`, which makes no full-size logits at all.)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
        ctx.save_for_backward(logits, targets)
        ctx.temp = temp
        blocks = zip(_blocks(logits), _blocks(targets))
        return -sum(dot(t, F.log_softmax(s / temp, dim=-1, dtype=_at_least_fp32(logits))) for s, t in blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=_at_least_fp32(logits), device=logits.device)
        for s, t, g in zip(_blocks(logits), _blocks(targets), _blocks(grad_logits)):
            probs = F.softmax(s / ctx.temp, dim=-1, dtype=g.dtype)
            _ce_gradient_(probs, t, out=g).mul_(grad / ctx.temp)
        return grad_logits.to(logits.dtype), None, None


class _TeacherRows:
    """One term's teacher probabilities block by block of rows, from its bottleneck features and the teacher's last
    layer (with a center), or sliced from probabilities made whole (Sinkhorn-Knopp balances all rows together); sums
    what the diagnostics need as the blocks go."""

    def __init__(self, term: _CenteredDistillation, features: Sequence[torch.Tensor], prototypes: torch.Tensor,
                 teacher_temp: float) -> None:
        self.term, self.teacher_temp = term, teacher_temp
        self.views = [f.detach().reshape(-1, f.shape[-1]) for f in features]
        self.prototypes = prototypes.detach().to(torch.promote_types(prototypes.dtype, term.center.dtype))
        self.rows = sum(len(v) for v in self.views)
        if term.centering == "center":
            self.whole = None
            self.entropy = self.prototypes.new_zeros(())
            self.probs_sum = self.prototypes.new_zeros(len(self.prototypes))
        else:
            self.whole, self.entropy = term.teacher_distributions([self._logits(v) for v in self.views], teacher_temp)
            self.probs_sum = sum(p.sum(0) for p in self.whole)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.prototypes.dtype) @ self.prototypes.T

    def block(self, rows: slice) -> list[torch.Tensor]:
        """Each view's probabilities of these rows."""
        if self.whole is not None:
            return [p[rows] for p in self.whole]
        blocks = []
        for view in self.views:
            logits = self._logits(view[rows])
            self.entropy += self.term.centered_softmax(logits, self.teacher_temp, out=logits)
            self.probs_sum += logits.sum(0)
            blocks.append(logits)
        return blocks


class _FusedLastLayerCE(torch.autograd.Function):
    """The total of several cross-view cross-entropies whose student logits are bottleneck features times the last
    layer's (K, C) weight, made block by block of rows (`SOFTMAX_BLOCK` elements) and never whole.

    Each block's logit gradient, (softmax * rowsum(targets) - targets) / temp, is turned at once into the features'
    gradient (G W) and added into the weight's (G^T z, one K x C buffer for every term): no full-size logits,
    probabilities or gradient exist, and the backward only scales. The terms are weighted inside, so one buffer serves
    them all; the values it returns beside the total are detached. Runs in fp32 at least, autocast or not; under CUDA
    autocast (a reduced precision the caller chose) its matmuls may use TF32, which keeps more of the logits' mantissa
    than the bf16 last layer of the logits path and runs on the tensor cores (DINOv2 trains with TF32 on throughout).
    """

    @staticmethod
    def forward(ctx, prototypes: torch.Tensor, terms: Sequence[tuple[list[int], _TeacherRows, float, float]],
                *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`terms`: per term, the positions of its student views in `features`, its teacher rows, the student's
        temperature and the term's weight in the total."""
        reduced = prototypes.is_cuda and torch.is_autocast_enabled()  # CUDA's autocast
        with torch.autocast(prototypes.device.type, enabled=False), _tf32_matmuls(reduced):
            w = prototypes.detach().to(_at_least_fp32(prototypes))
            grad_w = torch.zeros_like(w) if ctx.needs_input_grad[0] else None
            grads = [torch.zeros_like(f) for f in features]
            values = []
            for positions, teacher, student_temp, weight in terms:
                views = [features[i].detach().reshape(-1, w.shape[1]) for i in positions]
                view_grads = [grads[i].view(-1, w.shape[1]) for i in positions]
                partners = _partners(len(teacher.views), len(views))
                rows, per_block = len(views[0]), max(1, SOFTMAX_BLOCK // len(w))
                mean = rows * sum(map(len, partners))
                total = w.new_zeros(())
                for rows_j in (slice(i, i + per_block) for i in range(0, rows, per_block)):
                    teacher_j = teacher.block(rows_j)
                    for z, g, views_a in zip(views, view_grads, partners):
                        if not views_a:
                            continue
                        targets = _sum([teacher_j[a] for a in views_a])
                        z = z[rows_j].to(w.dtype)
                        log_probs = F.log_softmax((z @ w.T).div_(student_temp), dim=-1)
                        total -= dot(targets, log_probs)
                        d = _ce_gradient_(log_probs.exp_(), targets, out=log_probs).mul_(weight / (mean * student_temp))
                        g[rows_j] = d @ w
                        if grad_w is not None:
                            torch.addmm(grad_w, d.T, z, out=grad_w)  # not addmm_: FLOP counters see this one
                values.append(total / mean)
            values = torch.stack(values)
            total = values @ values.new_tensor([weight for *_, weight in terms])
        ctx.grads, ctx.prototypes_dtype = (grad_w, grads), prototypes.dtype
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("backward ran twice through the fused last layer and cross-entropy, whose gradients are "
                               "made once in the forward; compute the loss again instead of retaining its graph")
        (grad_w, grads), ctx.grads = ctx.grads, None
        grad_w = None if grad_w is None else grad_w.mul_(grad).to(ctx.prototypes_dtype)
        return grad_w, None, *(g.mul_(grad) for g in grads)


class DINOClsLoss(_CenteredDistillation):
    """DINO's [CLS] loss: every teacher global view supervises every *other* student crop."""

    def forward(self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], teacher_temp: float
                ) -> torch.Tensor:
        """`student_out`: (B, K) per crop, the 2 global views first; `teacher_out`: (B, K) per global view."""
        self._check("student_out", student_out, 2)
        self._check("teacher_out", teacher_out, 2)
        sums = self.center_sums(teacher_out)
        probs, entropy = self.teacher_distributions(teacher_out, teacher_temp)
        loss = _cross_view_ce(probs, student_out, self.student_temp)
        self.stats = teacher_stats(probs, entropy, loss)
        self.update_center(sums)
        return loss


class QueryLoss(_CenteredDistillation):
    """ADCLR's query loss: query i seen in view a (teacher) supervises query i seen in view b != a (student).

    The same query crops ride along with every view, so the pairs are positives by construction.
    """

    def forward(self, student_q: Sequence[torch.Tensor], teacher_q: Sequence[torch.Tensor], teacher_temp: float
                ) -> torch.Tensor:
        """`student_q`, `teacher_q`: (B, r, K) per view, the same r queries in the same order in every view."""
        self._check("student_q", student_q, 3)
        self._check("teacher_q", teacher_q, 3)
        if len({t.shape[:2] for t in [*student_q, *teacher_q]}) != 1:
            raise ValueError(
                "QueryLoss: every view must carry the same (B, r) queries, got shapes "
                f"{[tuple(t.shape) for t in [*student_q, *teacher_q]]}; append the same query crops to every view."
            )
        sums = self.center_sums(teacher_q)
        if student_q[0].shape[1] == 0:
            # Mean over zero queries would be NaN; a zero that stays on the student's graph keeps backward uniform.
            loss = torch.stack([s.sum() for s in student_q]).sum() * 0.0
            self.stats = {}
        else:
            probs, entropy = self.teacher_distributions(teacher_q, teacher_temp)
            loss = _cross_view_ce(probs, student_q, self.student_temp)
            self.stats = teacher_stats(probs, entropy, loss)
        self.update_center(sums)
        return loss


class IBOTPatchLoss(_CenteredDistillation):
    """iBOT's masked-image-modelling loss: the teacher's patch tokens of the unmasked view supervise the
    student's tokens at the masked positions of the *same* view.
    """

    def forward(
        self,
        student_patches: Sequence[torch.Tensor],
        teacher_patches: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        teacher_temp: float,
    ) -> torch.Tensor:
        """`student_patches`, `teacher_patches`: (B, N, K) per global view; `masks`: (B, N) bool, True = masked.

        Per image the loss is the mean over its masked patches (an image without any contributes 0), then
        averaged over images and views.
        """
        self._check("student_patches", student_patches, 3)
        self._check("teacher_patches", teacher_patches, 3)
        if not len(student_patches) == len(teacher_patches) == len(masks):
            raise ValueError(
                f"IBOTPatchLoss: got {len(student_patches)} student, {len(teacher_patches)} teacher and {len(masks)} "
                "mask entries; pass one of each per global view."
            )
        for s, t, m in zip(student_patches, teacher_patches, masks):
            if s.shape != t.shape or m.shape != s.shape[:2] or m.dtype != torch.bool:
                raise ValueError(
                    f"IBOTPatchLoss: student {tuple(s.shape)}, teacher {tuple(t.shape)} and mask {tuple(m.shape)} "
                    f"({m.dtype}) disagree; masks must be bool (B, N) matching the (B, N, K) patch outputs."
                )
        sums = self.center_sums(teacher_patches)
        # Only masked positions are scored, so softmaxes are computed for those rows alone (over their copies).
        probs, entropy = self.teacher_distributions([t[m] for t, m in zip(teacher_patches, masks)], teacher_temp,
                                                    overwrite=True)
        per_view, ce_rows = [], []
        for s, m, p in zip(student_patches, masks, probs):
            ce = -(p * self.student_log_probs(s[m])).sum(-1)
            ce_rows.append(ce)
            weight = (1.0 / m.sum(1).clamp(min=1)).unsqueeze(1).expand_as(m)[m]
            per_view.append((ce * weight).sum() / m.shape[0])
        # Diagnostics over the scored rows, unweighted: their KL is the rows' mean cross-entropy minus entropy.
        scored = sum(len(c) for c in ce_rows)
        self.stats = teacher_stats(probs, entropy, torch.cat(ce_rows).mean()) if scored else {}
        self.update_center(sums)
        return torch.stack(per_view).mean()


class ADCLRLoss(nn.Module):
    """`L = L_cls + lambda_q * L_query (+ lambda_patch * L_patch for the iBOT variant)`, each with its own center.

    With zero queries (or none passed) the total equals plain DINO's loss.
    """

    def __init__(
        self,
        out_dim: int,
        lambda_q: float = 1.0,
        lambda_patch: float = 0.0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
    ) -> None:
        super().__init__()
        self.lambda_q = lambda_q
        self.lambda_patch = lambda_patch
        self.cls = DINOClsLoss(out_dim, student_temp, center_momentum, centering)
        self.query = QueryLoss(out_dim, student_temp, center_momentum, centering)
        self.patch = IBOTPatchLoss(out_dim, student_temp, center_momentum, centering)

    def forward(
        self,
        student_cls: Sequence[torch.Tensor],
        teacher_cls: Sequence[torch.Tensor],
        teacher_temp: float,
        student_q: Sequence[torch.Tensor] | None = None,
        teacher_q: Sequence[torch.Tensor] | None = None,
        student_patches: Sequence[torch.Tensor] | None = None,
        teacher_patches: Sequence[torch.Tensor] | None = None,
        masks: Sequence[torch.Tensor] | None = None,
        *,
        query_teacher_temp: float | None = None,
        patch_teacher_temp: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns {'loss', 'cls', 'query', 'patch'}; absent terms are 0. The query and patch teacher
        temperatures default to `teacher_temp`.
        """
        if (student_q is None) != (teacher_q is None):
            raise ValueError("ADCLRLoss: pass both `student_q` and `teacher_q`, or neither (no query loss).")
        patch_inputs = (student_patches, teacher_patches, masks)
        if any(x is None for x in patch_inputs) and not all(x is None for x in patch_inputs):
            raise ValueError("ADCLRLoss: pass all of `student_patches`, `teacher_patches` and `masks`, or none of "
                             "them.")
        self._check_patch_inputs(masks)

        for term in (self.query, self.patch):  # stats only for the terms this call computes
            term.stats = {}
        cls = self.cls(student_cls, teacher_cls, teacher_temp)
        zero = cls.new_zeros(())
        query = zero
        if student_q is not None and teacher_q is not None:
            q_temp = teacher_temp if query_teacher_temp is None else query_teacher_temp
            query = self.query(student_q, teacher_q, q_temp)
        loss = cls + self.lambda_q * query
        patch = zero
        if student_patches is not None and teacher_patches is not None and masks is not None:
            t_temp = teacher_temp if patch_teacher_temp is None else patch_teacher_temp
            patch = self.patch(student_patches, teacher_patches, masks, t_temp)
            loss = loss + self.lambda_patch * patch
        return {"loss": loss, "cls": cls, "query": query, "patch": patch}

    def from_outputs(self, student: Mapping[str, Sequence[torch.Tensor]], teacher: Mapping[str, Sequence[torch.Tensor]],
                     teacher_temp: float, masks: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The terms from the networks' output dicts ('cls', 'query', 'patch' lists, as `SSLNetwork` returns them);
        queries count when the teacher has query outputs, patches when ``masks`` are given (iBOT). Outputs of networks
        that stop at the bottleneck (with 'prototypes', see `SSLNetwork`) go through the fused path (`fused`)."""
        if "prototypes" in student:
            return self.fused(student, teacher, teacher_temp, masks)
        with_q = bool(teacher["query"])
        return self(student["cls"], teacher["cls"], teacher_temp,
                    student["query"] if with_q else None, teacher["query"] if with_q else None,
                    student["patch"] if masks else None, teacher["patch"] if masks else None, masks or None)

    def fused(self, student: Mapping[str, Sequence[torch.Tensor]], teacher: Mapping[str, Sequence[torch.Tensor]],
              teacher_temp: float, masks: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """`from_outputs` for bottleneck features (..., C) and the last layer's (K, C) weight in 'prototypes': the [CLS]
        and query terms run through `_FusedLastLayerCE`, which never makes their full-size logits (the same loss, the
        same centers and diagnostics); the iBOT patch term takes its logits whole. 'cls' and 'query' come back
        detached: backpropagate 'loss'."""
        w_s, w_t = student["prototypes"][0], teacher["prototypes"][0]
        self._check_fused(student, teacher, w_s, w_t)
        self._check_patch_inputs(masks)
        uses = [(self.cls, student["cls"], teacher["cls"], 1.0)]
        if teacher["query"]:
            uses.append((self.query, student["query"], teacher["query"], self.lambda_q))
        features, terms, sums = [], [], []
        for term, student_views, teacher_views, weight in uses:
            sums.append(term.center_sums(teacher_views, w_t))
            positions = list(range(len(features), len(features) + len(student_views)))
            terms.append((positions, _TeacherRows(term, teacher_views, w_t, teacher_temp), term.student_temp, weight))
            features += student_views
        loss, values = _FusedLastLayerCE.apply(w_s, terms, *features)
        self.query.stats = self.patch.stats = {}
        for (term, *_), (_, rows, *_), value, term_sums in zip(uses, terms, values, sums):
            term.stats = stats_from_sums(rows.rows, rows.entropy, rows.probs_sum, value)
            term.update_center(term_sums)
        out = {"loss": loss, "cls": values[0], "query": values[1] if len(values) > 1 else loss.new_zeros(()),
               "patch": loss.new_zeros(())}
        if masks:
            out["patch"] = self.patch([p @ w_s.T for p in student["patch"]], [p @ w_t.T for p in teacher["patch"]],
                                      masks, teacher_temp)
            out["loss"] = loss + self.lambda_patch * out["patch"]
        return out

    @staticmethod
    def _check_fused(student: Mapping[str, Sequence[torch.Tensor]], teacher: Mapping[str, Sequence[torch.Tensor]],
                     w_s: torch.Tensor, w_t: torch.Tensor) -> None:
        if w_s.shape != w_t.shape or w_s.ndim != 2:
            raise ValueError(f"ADCLRLoss.fused: student prototypes {tuple(w_s.shape)} and teacher prototypes "
                             f"{tuple(w_t.shape)} must be the same (K, C) last-layer weight shape; build both networks "
                             "from one config.")
        for name in ("cls", "query"):
            views = [*student[name], *teacher[name]]
            if len({v.shape[:-1] for v in views}) > 1 or any(v.shape[-1] != w_s.shape[1] for v in views):
                raise ValueError(f"ADCLRLoss.fused: every {name!r} view must have the same rows of C={w_s.shape[1]} "
                                 f"bottleneck features, got {[tuple(v.shape) for v in views]}; pass the outputs of "
                                 "networks called with last_layer=False on the same batch.")

    def _check_patch_inputs(self, masks: Sequence[torch.Tensor] | None) -> None:
        if self.lambda_patch and not masks:
            raise ValueError(
                f"ADCLRLoss was built with lambda_patch={self.lambda_patch} (iBOT variant) but got no patch outputs; "
                "pass student_patches, teacher_patches and masks, or build it with lambda_patch=0."
            )

    def stats(self) -> dict[str, torch.Tensor]:
        """Collapse diagnostics of the last forward, e.g. `cls_teacher_entropy`, `query_kl` (see `diagnostics`), as
        0-dim tensors on the loss's device: `diagnostics.read_back` turns them into floats with one host sync."""
        terms = {"cls": self.cls, "query": self.query, "patch": self.patch}
        return {f"{name}_{key}": value for name, term in terms.items() for key, value in term.stats.items()}
