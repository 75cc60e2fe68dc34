"""The AOFT generator: D x d approximately orthogonal matrices built from one vector.

For q in R^D, q0 = q[0], u = q[1:]::

    Q(q) = [[ q0 , -u^T                  ],
            [ u  ,  I - u u^T / (1 + q0) ]]

is exactly orthogonal when ||q|| = 1 (a reflection-like construction: column 0 is q itself and every other column
is orthogonal to it and to each other). AOFT does not constrain ||q||, so the columns are only approximately
orthonormal during training. AO(q, d) is the first d columns: cost O(D d), D parameters whatever d is.
"""

from __future__ import annotations

import torch

# Guard (ours): 1 + q0 -> 0 divides by zero. We clamp the denominator at this value. q is initialised with q0 > 0
# (denominator > 1), so training would have to rotate q almost onto -e0 to reach the guard; where it does, the
# gradient through q0 stops instead of exploding. The value keeps 1/(1+q0) well inside FP16's range (max 65504).
DENOM_EPS = 1e-3


def ao_basis(q: torch.Tensor, d: int) -> torch.Tensor:
    """First ``d`` columns of Q(q): [D, d] for q [D], or [..., D, d] for a batch of vectors q [..., D] (one call for
    every slice of a layer: the generator is a dozen tiny ops, so per-call overhead, not arithmetic, is its cost).
    Orthonormal columns when ||q|| = 1."""
    if q.dim() < 1:
        raise ValueError(f"q must be a vector or a batch of vectors, got shape {tuple(q.shape)}")
    D = q.shape[-1]
    if not 1 <= d <= D:
        raise ValueError(f"rank d={d} must be in [1, {D}]")
    q0, u = q[..., :1], q[..., 1:]
    denom = (1.0 + q0).clamp_min(DENOM_EPS)  # [..., 1]
    head = u[..., : d - 1]  # u_j for the columns j = 1..d-1
    top = torch.cat([q0, -head], dim=-1).unsqueeze(-2)  # row 0: [..., 1, d]
    eye = torch.eye(D - 1, d - 1, dtype=q.dtype, device=q.device)
    outer = u.unsqueeze(-1) * (head / denom).unsqueeze(-2)  # u head^T / (1 + q0): [..., D-1, d-1]
    body = torch.cat([u.unsqueeze(-1), eye - outer], dim=-1)  # rows 1..D-1
    return torch.cat([top, body], dim=-2)


def random_unit_vector(D: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Default init (ours): a uniformly random unit vector flipped so that q0 > 0, far from the 1 + q0 = 0 pole."""
    q = torch.randn(D, generator=generator)
    q = q / q.norm()
    q[0] = q[0].abs() + 1e-12
    return q / q.norm()


def orthogonality_error(m: torch.Tensor) -> float:
    """max |M^T M - I| over the columns of M."""
    gram = m.T @ m
    return (gram - torch.eye(gram.shape[0], dtype=m.dtype, device=m.device)).abs().max().item()
