"""What a training step keeps on the device so that it never waits for it: running metric sums and a
non-finite guard, both read by the host in one transfer every `log_every` steps and at epoch end.

A read (`.item()`, `float(t)`, `bool(t)`, `print(t)`) of a CUDA tensor makes the host wait until the GPU
has caught up, and the GPU then idles until the host queues the next kernels: at a large batch, reading
eight metrics per step costs a third of the throughput. So the step only queues work; `read_scalars` is the
one place the host reads, and the training loop calls it once per window.
"""

from __future__ import annotations

import torch

from vae_core.errors import NonFiniteLossError

WHERE = ("loss", "discriminator loss")  # what a guard check names, by its `where` code


def read_scalars(tensors: list[torch.Tensor]) -> list[float]:
    """Every element of `tensors` as Python floats, in one device-to-host transfer: the host's one wait."""
    if not tensors:
        return []
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]).tolist()


class FiniteGuard:
    """A found-inf flag on the device, as gradient scalers and fused optimizers use one.

    `check` folds a step's loss and gradient norm into the flag without reading them; `arm` hands the flag
    to fused optimizers, whose kernels skip the update (weights, moments and step count) while it is set.
    It stays set, so from the first non-finite value on no update lands: when the host next reads (`raise_if_bad`),
    the weights are those from before that step, and the error names it.
    """

    def __init__(self, device: torch.device) -> None:
        self.found_inf = torch.zeros((), device=device)
        # [first bad step, where code, loss, gradient norm]; step -1 while nothing was bad.
        self.first = torch.tensor([-1.0, 0.0, 0.0, 0.0], dtype=torch.float64, device=device)

    def arm(self, *optimizers: torch.optim.Optimizer | None) -> None:
        """Hand the flag to the fused optimizers among `optimizers` (only fused kernels take it)."""
        for opt in optimizers:
            if opt is not None and opt.defaults.get("fused"):
                opt.found_inf, opt.grad_scale = self.found_inf, None  # type: ignore[attr-defined]

    def armed(self, optimizer: torch.optim.Optimizer) -> bool:
        return getattr(optimizer, "found_inf", None) is self.found_inf

    def before_step(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """For an optimizer that cannot take the flag (not fused): read it now, and raise before the update.
        The one path that waits for the device every step; `vae_core.training.fit.make_optimizer` never takes it."""
        if not self.armed(optimizer):
            self.raise_if_bad(read_scalars([self.first]), epoch)

    @staticmethod
    def disarm(*optimizers: torch.optim.Optimizer | None) -> None:
        for opt in optimizers:
            if opt is not None:
                opt.found_inf = opt.grad_scale = None  # type: ignore[attr-defined]

    def check(self, step: int, where: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record whether `loss` and `grad_norm` (scalars) are finite; nothing is read."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        # torch.full, not torch.tensor: a fill kernel takes the number as an argument, where torch.tensor
        # would copy it from the host and wait for the copy.
        f64 = {"dtype": torch.float64, "device": loss.device}
        record = torch.cat([torch.full((1,), float(step), **f64), torch.full((1,), float(where), **f64),
                            loss.detach().double().reshape(1), grad_norm.detach().double().reshape(1)])
        self.first.copy_(torch.where(bad & (self.first[0] < 0), record, self.first))
        self.found_inf.copy_(torch.maximum(self.found_inf, bad.to(self.found_inf.dtype)))

    def raise_if_bad(self, values: list[float], epoch: int) -> None:
        """Raise for the first bad step, given this guard's `first` as read (4 floats)."""
        step, where, loss, grad_norm = values
        if step >= 0:
            raise NonFiniteLossError(
                f"non-finite {WHERE[int(where)]}: loss is {loss} (gradient norm {grad_norm}) at step {int(step)} "
                f"(epoch {epoch}); no update was applied from that step on; lower train.lr, set train.grad_clip, "
                "or check the data")


class MetricSums:
    """Image-weighted sums of a step's scalar metrics, kept on the device; `mean` reads them once.

    A term only some steps have (the adversarial ones, from their start step) is averaged over those steps.
    """

    def __init__(self) -> None:
        self.sums: dict[tuple[str, ...], torch.Tensor] = {}  # one stacked vector per set of keys
        self.images: dict[str, int] = {}

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        keys = tuple(terms)
        vector = torch.stack([v.detach().float() for v in terms.values()]) * images
        self.sums[keys] = self.sums[keys] + vector if keys in self.sums else vector
        for k in keys:
            self.images[k] = self.images.get(k, 0) + images

    def merge(self, other: MetricSums) -> None:
        for keys, vector in other.sums.items():
            self.sums[keys] = self.sums[keys] + vector if keys in self.sums else vector
        for k, n in other.images.items():
            self.images[k] = self.images.get(k, 0) + n

    def tensors(self) -> list[torch.Tensor]:
        return list(self.sums.values())

    def means(self, values: list[float]) -> dict[str, float]:
        """The means, given `tensors()` as read by `read_scalars`."""
        out: dict[str, float] = {}
        at = 0
        for keys in self.sums:
            for k, v in zip(keys, values[at : at + len(keys)]):
                out[k] = out.get(k, 0.0) + v
            at += len(keys)
        return {k: v / self.images[k] for k, v in out.items()}
