"""Row-wise Adagrad for sparse embedding gradients: one accumulator per row instead of one per weight."""

from __future__ import annotations

import torch

__all__ = ["RowWiseAdagrad"]


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad whose squared-gradient accumulator is the mean over a row's dims (DLRM / FBGEMM practice).

    State per ``[rows, dim]`` parameter: ``sum`` of shape ``[rows]`` (4 bytes a row), so the optimizer adds
    ``1/dim`` of the table instead of a full copy. Works with sparse gradients (only touched rows change)
    and dense ones. 1-D parameters fall back to one accumulator per element. A low-precision (fp16)
    parameter is updated in fp32 and written back rounded to nearest, as FBGEMM's fused fp16 kernel does.

    Update for a touched row ``i`` with gradient ``g_i``:
    ``sum_i += mean(g_i ** 2)``; ``w_i -= lr * g_i / (sqrt(sum_i) + eps)``.

    >>> w = torch.nn.Parameter(torch.ones(4, 2))
    >>> opt = RowWiseAdagrad([w], lr=0.1)
    >>> w.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2))
    >>> opt.step()
    >>> w.data[0].tolist(), [round(v, 4) for v in w.data[1].tolist()]
    ([1.0, 1.0], [0.9, 0.9])
    """

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-8) -> None:
        if lr <= 0:
            raise ValueError(f"RowWiseAdagrad: lr must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    shape = p.shape[:1] if p.dim() > 1 else p.shape
                    state["sum"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                acc = state["sum"]
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values().float()
                    sq = values.pow(2).flatten(1).mean(1) if values.dim() > 1 else values.pow(2)
                    acc.index_add_(0, rows, sq)
                    scale = (acc[rows].sqrt() + eps).reciprocal().mul_(-lr)
                    if values.dim() > 1:
                        scale = scale.view(-1, *([1] * (values.dim() - 1)))
                    if p.dtype == torch.float32:
                        p.index_add_(0, rows, values * scale)
                    else:  # the coalesced rows are unique: one fp32 update, one rounding
                        p[rows] = (p[rows].float() + values * scale).to(p.dtype)
                else:
                    grad = grad.float()
                    sq = grad.pow(2).flatten(1).mean(1) if grad.dim() > 1 else grad.pow(2)
                    acc.add_(sq)
                    denom = acc.sqrt().add_(eps)
                    if grad.dim() > 1:
                        denom = denom.view(-1, *([1] * (grad.dim() - 1)))
                    if p.dtype == torch.float32:
                        p.addcdiv_(grad, denom, value=-lr)
                    else:
                        p.copy_(p.float().addcdiv_(grad, denom, value=-lr))
        return loss
