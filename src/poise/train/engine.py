"""How one optimizer step runs: mixed precision, gradient accumulation, gradient averaging across
processes and the finiteness checks. The trainer drives it; methods reach it through ``ctx.autocast()``,
``ctx.backward(loss)`` and ``ctx.optimizer_step()``.

Order within one optimizer step (``accumulate`` micro-batches):

    [per micro-batch]  forward and loss under autocast -> ctx.backward: loss / accumulate, scaled (fp16),
                       backward outside autocast (DDP averages during the last micro-batch's backward)
    finish_gradients:  average what DDP did not (a method's own parameters; everything for methods that
                       own the step or backpropagate several times), add the gradients a method handed in
                       with ``add_gradients`` (already averaged), unscale (fp16), drop the gradients of
                       frozen parameters                      <- every gradient a method sees is final
    after_backward     (gradient edits)
    optimizer_step:    finiteness check (one host sync), clipping, step (through the scaler), zero grad
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from poise.errors import PoiseError
from poise.train.distributed import all_reduce_mean, average_gradients, is_distributed

if TYPE_CHECKING:
    from poise.config import RunConfig

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: gradient tensors of at most this many values on average count as small for the finiteness check
SMALL_TENSOR = 4096


class NonFiniteError(PoiseError):
    """A loss or gradient became NaN or infinite."""


def make_grad_scaler(device: torch.device) -> Any:
    """The loss scaler of fp16 training (``torch.amp.GradScaler``; the CUDA-only class on older PyTorch)."""
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError):
        return torch.cuda.amp.GradScaler()


def gradient_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of a list of gradients: one fused reduction; not finite iff some value is not."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def gradient_groups(model: nn.Module, extra: list[nn.Parameter]) -> dict[str, list[nn.Parameter]]:
    """Parameters by what they belong to, named as an error message names them."""
    groups: dict[str, list[nn.Parameter]] = {}
    if hasattr(model, "modality_parameters") and hasattr(model, "head_parameters"):
        for m in model.modalities:
            groups[f"modality '{m}' (its encoder)"] = [p for p in model.modality_parameters(m) if p.requires_grad]
        groups["the fusion head"] = [p for p in model.head_parameters() if p.requires_grad]
    else:
        groups["the model"] = [p for p in model.parameters() if p.requires_grad]
    if extra:
        groups["the method's own parameters"] = extra
    return {name: params for name, params in groups.items() if params}


class StepEngine:
    """One run's step machinery. ``forward_module`` is what the training forward goes through: the
    DistributedDataParallel wrapper of ``model`` in a multi-process run, else ``model`` itself."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: RunConfig, device: torch.device,
                 method_name: str, owns_optimizer_step: bool, forward_module: nn.Module | None = None,
                 where: Callable[[], tuple[int, int]] = lambda: (0, 0), multiple_backward: bool = False):
        t = config.trainer
        self.model, self.optimizer, self.device = model, optimizer, device
        self.forward_module = forward_module if forward_module is not None else model
        self.ddp = isinstance(self.forward_module, DistributedDataParallel)
        self.method_name = method_name
        self.owns_step = owns_optimizer_step
        #: gradients averaged here, not by DDP: the method backpropagates several times or takes its own steps
        self.manual_average = owns_optimizer_step or multiple_backward
        self.accumulate = t.accumulate
        self.grad_clip = t.grad_clip
        self.amp_dtype = AMP_DTYPES.get(t.amp)
        self.scaler = make_grad_scaler(device) if t.amp == "fp16" else None
        #: (epoch, step) of the batch in progress, for messages
        self.where = where
        model_ids = {id(p) for p in model.parameters()}
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.extra_params = [p for p in self.params if id(p) not in model_ids]
        self.groups = gradient_groups(model, self.extra_params)
        #: small gradient tensors (a few thousand values each): the finiteness check copies them into one and
        #: sums it, which costs less than a reduction per tensor; large ones are reduced where they are
        self._concat_check = sum(p.numel() for p in self.params) <= SMALL_TENSOR * max(len(self.params), 1)
        self.backward_calls = 0
        self._gradients_final = False
        self._loss_flags: list[tuple[int, int, list[str], list[Tensor]]] = []
        #: gradients handed in by the method (``add_gradients``): already averaged over processes, unscaled
        self._added: dict[int, tuple[nn.Parameter, Tensor]] = {}
        #: a loss added to the next backward of the micro-batch (the fusion's auxiliary heads)
        self._carried: Tensor | None = None
        #: parameters whose gradients are dropped before every step (a method's training phase)
        self.frozen: list[nn.Parameter] = []

    # ---- forward ----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Wraps a micro-batch's forward and backward: DDP averages gradients only in the last
        micro-batch of a step, and never for methods that own the step (they may backpropagate several
        times per forward; their gradients are averaged in ``finish_gradients``)."""
        if self.ddp and (self.manual_average or not sync):
            return self.forward_module.no_sync()
        return contextlib.nullcontext()

    # ---- backward ---------------------------------------------------------------------------------
    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        if self.owns_step and self._gradients_final and self.scaler is not None:
            raise PoiseError(
                f"method '{self.method_name}' called ctx.backward twice without ctx.optimizer_step in between; "
                "with trainer.amp fp16 every backward of a method that owns the step must be followed by a step"
            )
        if self._carried is not None:
            loss, self._carried = loss + self._carried, None
        if self.accumulate > 1:
            loss = loss / self.accumulate
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        if self.amp_dtype is None:
            loss.backward(retain_graph=retain_graph)  # no autocast to leave (entering a disabled one costs more than a small step's ops)
        else:
            with torch.autocast(device_type=self.device.type, enabled=False):
                loss.backward(retain_graph=retain_graph)
        self.backward_calls += 1
        if self.owns_step:
            self.finish_gradients()

    def carry(self, loss: Tensor | None) -> None:
        """Add ``loss`` to the next backward of this micro-batch (whatever the method backpropagates)."""
        self._carried = loss

    def flush_carried(self) -> None:
        """Backpropagate a carried loss that no backward of the method took (it skipped the batch)."""
        if self._carried is None:
            return
        if self.owns_step:
            self._carried = None  # its step is over: the heads skip this batch as the method did
        else:
            self.backward(self._carried.new_zeros(()))

    def gradients(self, loss: Tensor, params: list[nn.Parameter], retain_graph: bool = False) -> list[Tensor]:
        """The gradients of ``loss`` on ``params`` (zeros where a parameter does not take part), averaged over
        processes and unscaled; ``.grad`` is left as it is. Under fp16 the loss is scaled for the backward
        pass so that small gradients survive, and the result divided back. ``retain_graph=True`` keeps the
        graph for the losses still to come."""
        params = list(params)
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        with torch.autocast(device_type=self.device.type, enabled=False):
            grads = torch.autograd.grad(scaled, params, retain_graph=retain_graph, allow_unused=True)
        out = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if self.scaler is not None:
            inv = 1.0 / self.scaler.get_scale()
            out = [g * inv for g in out]
        if is_distributed() and out:
            flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in out]))
            out = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in out]), out)]
        return out

    def add_gradients(self, params: list[nn.Parameter], grads: list[Tensor]) -> None:
        """Add gradients that a method computed (with ``gradients``: already averaged and unscaled) to this
        step's gradient, weighted by 1 / ``accumulate`` as ``backward`` weights a loss. They are added in
        ``finish_gradients``, after the averaging of what ``backward`` produced, so they are averaged once."""
        for p, g in zip(params, grads):
            g = g.detach() / self.accumulate if self.accumulate > 1 else g.detach()
            if self._gradients_final:  # after a step-owning method's backward: the gradients are final already
                p.grad = g.to(p.dtype).clone() if p.grad is None else p.grad + g.to(p.dtype)
                continue
            key = id(p)
            self._added[key] = (p, g if key not in self._added else self._added[key][1] + g)

    def release_without_backward(self, output: Any) -> None:
        """A DDP step in which the method backpropagated nothing (it skipped the batch): every rank must
        still take part in the gradient reduction DDP prepared in the forward. A zero backward does that;
        the gradients are then dropped, so the step changes nothing (unless earlier micro-batches of the
        step backpropagated: their gradients stay and are averaged by this reduction)."""
        from torch.nn.parallel.distributed import _find_tensors

        if not self.ddp or self.manual_average:
            # gradients averaged at the step: the forward ran under no_sync, DDP waits for no reduction
            return
        anchors = [t.sum() for t in _find_tensors(output) if t.requires_grad]
        earlier = self.backward_calls > 0  # gradients of earlier micro-batches of this step: keep them
        if anchors:
            with torch.autocast(device_type=self.device.type, enabled=False):
                (torch.stack([a.float() for a in anchors]).sum() * 0.0).backward()
            if not earlier:
                self.optimizer.zero_grad(set_to_none=True)

    def has_gradients(self) -> bool:
        return bool(self._added) or any(p.grad is not None for p in self.params)

    def finish_gradients(self) -> None:
        """Make the gradients final before any method reads them: averaged over ranks, unscaled."""
        if self._gradients_final:
            return
        if is_distributed():
            if self.manual_average or not self.ddp:
                average_gradients(self.params)
            elif self.extra_params:
                average_gradients(self.extra_params)
        if self._added:
            # scaled like the backward's gradients, so that the scaler's unscale also checks them
            if self.scaler is not None:
                self.scaler.scale(torch.zeros((), device=self.device))  # starts the scaler when no backward did
            scale = self.scaler.get_scale() if self.scaler is not None else 1.0
            for p, g in self._added.values():
                g = g.to(p.dtype) * scale if scale != 1.0 else g.to(p.dtype)
                p.grad = g.clone() if p.grad is None else p.grad + g
            self._added.clear()
        if self.scaler is not None and self.has_gradients():
            self.scaler.unscale_(self.optimizer)
        for p in self.frozen:
            p.grad = None
        self._gradients_final = True

    # ---- checks -----------------------------------------------------------------------------------
    def note_loss(self, terms: dict[str, Tensor]) -> None:
        """Remember the loss terms (no sync, no computation; checked at the next step)."""
        if not terms:
            return
        values = [v.detach() if v.dim() == 0 else v.detach().sum() for v in terms.values()]
        epoch, step = self.where()
        self._loss_flags.append((epoch, step, list(terms), values))

    def check_finite(self, gradients: bool = True) -> None:
        """Raise NonFiniteError naming the step, the method and the loss term or the modality whose
        values are not finite. One host sync for all pending loss terms and every gradient: their sums or
        norms, not finite iff some value is not (or overflows); only then is each looked at on its own.
        Gradients are not checked under fp16: there the scaler skips a step with overflowing gradients."""
        values = [v.float().to(self.device) for *_, vs in self._loss_flags for v in vs]
        grads = []
        if gradients and self.scaler is None:
            grads = [p.grad for params in self.groups.values() for p in params if p.grad is not None]
        if not values and not grads:
            return
        pending, self._loss_flags = self._loss_flags, []
        if grads and self._concat_check:
            total = torch.cat([v.reshape(1) for v in values] + [g.reshape(-1).float() for g in grads]).sum()
        else:
            # one fused norm per tensor: a single read of every gradient
            total = torch.stack(values + list(torch._foreach_norm(grads)) if grads else values).sum()
        if math.isfinite(total):  # the one host sync
            return
        epoch, step = self.where()
        for loss_epoch, loss_step, names, terms in pending:
            for name, v in zip(names, terms):
                if not bool(torch.isfinite(v).all()):
                    raise NonFiniteError(
                        f"loss term '{name}' of method '{self.method_name}' is not finite at epoch {loss_epoch}, step {loss_step}"
                    )
        if not grads:
            return
        for name, params in self.groups.items():
            if any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params):
                raise NonFiniteError(
                    f"the gradient of {name} is not finite after the backward pass and the gradient edits of "
                    f"method '{self.method_name}' at epoch {epoch}, step {step}"
                )
        # finite values whose sum or norm overflowed: nothing to report

    # ---- the step ---------------------------------------------------------------------------------
    def optimizer_step(self) -> None:
        """Finish the gradients, check them, clip, step (through the scaler) and zero them. A step
        without any gradient (the method skipped the batch) leaves the parameters and the optimizer
        state as they are."""
        if not self.has_gradients():
            self.check_finite(gradients=False)
            self._reset()
            return
        self.finish_gradients()
        self.check_finite()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._reset()

    def _reset(self) -> None:
        self.backward_calls = 0
        self._gradients_final = False
        self._added.clear()

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


__all__ = ["AMP_DTYPES", "NonFiniteError", "StepEngine", "gradient_groups", "gradient_norm", "make_grad_scaler"]
