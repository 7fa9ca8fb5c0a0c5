"""Soft permutations: doubly stochastic matrices acting through a spec's layouts, and Sinkhorn.

A hard permutation ``p`` (``p[i]`` = the unit of B that lands at position ``i``) is the 0/1 matrix
``M[i, p[i]] = 1``; :func:`soft_permute_tensor` applies any ``(n, n)`` matrix ``M`` the same way
:func:`permerge.apply.permute_tensor` applies ``p``, through every layout an :class:`Axis` can
describe (blocks of a flattened conv, heads, the within-head dims shared by every head, slices of a
concatenation): each unit's positions become ``Σ_j M[i, j]·(unit j's positions)``. With a 0/1
matrix the result equals ``permute_tensor``'s exactly, so relaxed matchers (Frank–Wolfe in
``c2m3.py``, Sinkhorn re-basin in ``sinkhorn.py``) optimise the same objective the hard ones do.
Everything here is differentiable.

:func:`sinkhorn` is the Sinkhorn operator with implicit differentiation (Eisenberger et al., CVPR
2022, as used by Sinkhorn re-basin): the backward pass solves the linear system of the fixed
point's optimality conditions instead of unrolling the iterations, so memory does not grow with
them and the gradient is that of the converged matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from permerge.spec import Axis, PermutationSpec

Relaxed = dict[str, torch.Tensor]
"""Group → ``(n, n)`` matrix (doubly stochastic, or a permutation's 0/1 matrix)."""

__all__ = ["Relaxed", "as_matrix", "gradient", "sinkhorn", "soft_apply", "soft_permute_tensor", "universe_objective"]


def as_matrix(p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 0/1 matrix of index vector ``p``: ``M[i, p[i]] = 1``."""
    n = len(p)
    m = torch.zeros(n, n, dtype=dtype)
    m[torch.arange(n), p.long()] = 1
    return m


def _mix(t: torch.Tensor, ax: Axis, m: torch.Tensor) -> torch.Tensor:
    """``t`` with unit ``i`` of ``ax`` replaced by ``Σ_j m[i, j]·unit j`` (out of place)."""
    n, dim = m.shape[0], ax.dim % t.dim()
    m = m.to(t.dtype)
    if (ax.block, ax.offset, ax.repeat) == (1, 0, 1) and t.shape[dim] == n:
        x = t.movedim(dim, 0)
        return (m @ x.reshape(n, -1)).reshape(x.shape).movedim(0, dim)
    pos = ax.positions(n).flatten().to(t.device)
    x = t.index_select(dim, pos).movedim(dim, 0)  # (repeat * n * block, rest...)
    y = torch.einsum("ij,rjk->rik", m, x.reshape(ax.repeat, n, -1)).reshape(x.shape)
    return t.index_copy(dim, pos, y.movedim(0, dim))


def soft_permute_tensor(
    t: torch.Tensor, axes: tuple[tuple[str, Axis], ...], mats: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``t`` mixed along every ``(group, axis)`` whose group has a matrix in ``mats``.

    Mixes of different dimensions commute; two groups sharing one dimension (heads × head_dim)
    act on factorised positions, so their mixes commute too (a Kronecker product).
    """
    for name, ax in axes:
        m = mats.get(name)
        if m is not None:
            t = _mix(t, ax, m)
    return t


def soft_apply(
    spec: PermutationSpec, mats: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The spec's tensors of ``sd`` mixed by ``mats`` (tensors no group touches are left out)."""
    return {k: soft_permute_tensor(sd[k], spec.axes_of(k), mats) for k in spec.keys}


def universe_objective(
    spec: PermutationSpec, thetas: Sequence[Mapping[str, torch.Tensor]], relaxed: Sequence[Mapping[str, torch.Tensor]]
) -> torch.Tensor:
    """``Σ_{i<j} ⟨π_i θ_i, π_j θ_j⟩`` over the spec's tensors, with (relaxed) matrices ``relaxed[i]``
    (groups without one are not moved); for two models and ``relaxed = [{}, P]`` it is weight
    matching's objective ``⟨θ_A, P·θ_B⟩``. Summed in float64."""
    mapped = [soft_apply(spec, r, t) for r, t in zip(relaxed, thetas)]
    total = torch.zeros((), dtype=torch.float64)
    for k in spec.keys:
        s = sum(m[k] for m in mapped)
        total = total + 0.5 * (s.double().square().sum() - sum(m[k].double().square().sum() for m in mapped))
    return total


def gradient(spec: PermutationSpec, thetas: Sequence[Mapping[str, torch.Tensor]],
             relaxed: Sequence[Relaxed]) -> tuple[float, list[dict[str, torch.Tensor]]]:  # fmt: skip
    """:func:`universe_objective` and its gradient with respect to the matrices of models 1.. (model
    0 is the reference). For two models the gradient for group ``g`` is weight matching's cost
    matrix ``C[i, j] = ⟨A's unit i, B's unit j⟩`` with the other groups mixed as given."""
    leaves = [{g: m.detach().requires_grad_(True) for g, m in r.items()} for r in relaxed]
    f = universe_objective(spec, thetas, leaves)
    f.backward()
    return f.item(), [{g: m.grad for g, m in r.items()} for r in leaves[1:]]  # type: ignore[misc]


class _Sinkhorn(torch.autograd.Function):
    """Log-domain Sinkhorn with the implicit-function-theorem backward (uniform marginals)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, tau: float, iters: int, tol: float) -> torch.Tensor:  # type: ignore[override]
        log_p = scores.detach().double() / tau
        for _ in range(iters):
            log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
            log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
            if (log_p.exp().sum(1) - 1).abs().max() < tol:
                break
        p = log_p.exp()
        ctx.save_for_backward(p)
        ctx.tau = tau
        return p.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        # P = exp(S/τ + f 1ᵀ + 1 gᵀ) with unit row and column sums. Differentiating the constraints
        # gives [I P; Pᵀ I]·[df; dg] = −[(P∘dS)1; (P∘dS)ᵀ1]/τ (singular along f+c, g−c: dg_n = 0),
        # so with H = G∘P and w solving that system for [H1; Hᵀ1]: dL/dS = (H − P∘(w_f 1ᵀ + 1 w_gᵀ))/τ.
        (p,) = ctx.saved_tensors
        n = p.shape[0]
        h = grad.double() * p
        eye = torch.eye(n, dtype=p.dtype, device=p.device)
        k = torch.cat([torch.cat([eye, p], 1), torch.cat([p.T, eye], 1)], 0)[:-1, :-1]
        rhs = torch.cat([h.sum(1), h.sum(0)[:-1]])
        # As P nears a permutation the system nears singularity (every (x, −Pᵀx) is then a null
        # vector); a tiny ridge keeps the solve finite, and the gradient there is ~0 anyway.
        w = torch.linalg.solve(k + 1e-9 * torch.eye(2 * n - 1, dtype=k.dtype, device=k.device), rhs)
        w_f, w_g = w[:n], torch.cat([w[n:], w.new_zeros(1)])
        ds = (h - p * (w_f[:, None] + w_g[None, :])) / ctx.tau
        return ds.to(grad.dtype), None, None, None


def sinkhorn(scores: torch.Tensor, tau: float = 1.0, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The doubly stochastic matrix nearest ``exp(scores / tau)`` (Sinkhorn–Knopp, in log space).

    Higher ``scores[i, j]`` favour unit ``j`` of B at position ``i``; as ``tau → 0`` the result
    tends to the permutation matrix of the assignment maximising ``Σ scores[i, p[i]]``. Iterates
    until every row sum is within ``tol`` of 1 (or ``iters`` ran out); gradients flow to
    ``scores`` by implicit differentiation of that fixed point.

    Example:
        >>> p = sinkhorn(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), tau=0.1)
        >>> torch.allclose(p, torch.eye(2), atol=1e-6)
        True
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return _Sinkhorn.apply(scores, tau, iters, tol)
