"""The student: one model holding the merged weights, trained through its coefficients.

dL/dalpha[k, s] = sum over chunk s of (dL/dtheta_merged * tau_k), so a plain
backward through the model, followed by a projection of each weight gradient
onto the task vectors, gives the exact coefficient gradients. The task vectors
never enter the autograd graph: memory stays at one model plus activations.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from .coefficients import chunk_count, chunk_shares, expand_chunks, reduce_chunks
from .errors import ExpertMergingError
from .objective import regularizer
from .task_vectors import ResidentTaskVectors, TaskVectors

EPSILON = 1e-4


def activation_fns(name: str) -> tuple[Callable, Callable]:
    """(activation, its inverse): alpha = f(w), w = f^-1(alpha)."""
    if name == "sigmoid":

        def inverse(alpha: float) -> float:
            alpha = min(max(alpha, EPSILON), 1 - EPSILON)
            return math.log(alpha / (1 - alpha))

        return torch.sigmoid, inverse
    if name == "identity":
        return (lambda w: w), (lambda alpha: alpha)
    raise ValueError(f"unknown activation {name!r}")


def select_weights(names: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """The mergeable weights: every name not matched by an exclusion regex."""
    patterns = [re.compile(p) for p in exclude]
    return [n for n in names if not any(p.search(n) for p in patterns)]


class Student:
    """Merged-weight model plus trainable per-(expert, chunk) coefficients."""

    def __init__(
        self,
        model: torch.nn.Module,
        task_vectors: TaskVectors | Mapping[str, torch.Tensor],
        init: Sequence[float] | None = None,
        activation: str = "sigmoid",
        chunks: Mapping[str, int] | None = None,
        start: Mapping[str, torch.Tensor] | None = None,
        autocast=contextlib.nullcontext,
        parameters: Mapping[str, torch.nn.Parameter] | None = None,
        frozen: Sequence[str] = (),
    ):
        """``task_vectors``: a TaskVectors, or {name: [K, numel]} with the base
        taken from the model's current weights; ``parameters``: the model's
        parameters by checkpoint name, where that differs from the in-memory
        name (see :mod:`mergekit_expert.multimodal`); ``init`` None creates no
        coefficients until :meth:`reset` (the initial alpha is searched first);
        ``frozen``: weights merged at the initial alphas and never trained (not
        part of R either); see :meth:`reset` for the rest."""
        self.model = model
        self.autocast = autocast  # forward passes only; coefficient math stays fp32
        self.activation, self.inverse = activation_fns(activation)
        self.inverse_tensor = (
            (lambda a: torch.logit(a.double(), eps=EPSILON).float())
            if activation == "sigmoid"
            else (lambda a: a.clone())
        )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        params = dict(parameters or model.named_parameters())
        if not isinstance(task_vectors, TaskVectors):
            base = {n: params[n].detach().reshape(-1).clone() for n in task_vectors}
            task_vectors = ResidentTaskVectors(base, task_vectors)
        self.task_vectors = task_vectors
        self.weights = {name: params[name] for name in task_vectors.names}
        self.raw: dict[str, torch.nn.Parameter] = {}
        self.fixed: dict[str, torch.Tensor] = {}
        self.shares: dict[str, torch.Tensor] = {}  # chunk sizes / numel, [m]
        self.frozen = set(frozen)
        self.frozen_alphas: dict[str, torch.Tensor] = {}
        self.init: list[float] = []
        if init is not None:
            self.reset(init, chunks, start)

    def reset(
        self,
        init: Sequence[float],
        chunks: Mapping[str, int] | None = None,
        start: Mapping[str, torch.Tensor] | None = None,
        fixed: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """(Re)create the raw coefficients: alpha = init_k everywhere, or ``start``.

        ``chunks`` asks for m chunks per weight (torch.chunk decides the real
        count); ``start`` gives initial raw (pre-activation) values [K, m] or
        [K, 1] to broadcast, so a warm start reproduces alphas bit for bit;
        weights in ``fixed`` keep those alphas [K, 1] and are not trained.
        The regularizer always pulls towards ``init`` (the paper's R), so a
        warm-started stage 2 keeps minimizing stage 1's objective.
        """
        # The regularizer's target is the float32 alpha the raw init really gives,
        # so |alpha - init| starts at exactly 0 (Adam would amplify rounding noise).
        self.init = [self.settled(float(a)) for a in init]
        self.raw, self.fixed, self.shares = {}, {}, {}
        self.frozen_alphas = {
            name: torch.tensor(self.init, dtype=torch.float32)[:, None]
            for name in self.frozen
        }
        for name in self.task_vectors.names:
            if name in self.frozen:
                continue
            device = self.weights[name].device
            if fixed is not None and name in fixed:
                self.fixed[name] = fixed[name].detach().to(device, torch.float32)
                self.weights[name].requires_grad_(False)
                continue
            m = chunk_count(self.task_vectors.numel(name), (chunks or {}).get(name, 1))
            if start is not None and name in start:
                values = start[name].detach().to(torch.float32).cpu()
                if values.shape[1] == 1 and m > 1:
                    values = values.expand(-1, m).contiguous()
            else:
                values = torch.tensor([[self.inverse(a)] * m for a in self.init])
            self.raw[name] = torch.nn.Parameter(
                values.to(device=device, dtype=torch.float32).clone()
            )
            self.shares[name] = chunk_shares(self.task_vectors.numel(name), m).to(
                device
            )
            self.weights[name].requires_grad_(True)

    def settled(self, alpha: float) -> float:
        """The float32 alpha that raw = inverse(alpha) gives back exactly.

        One round trip through the activation can land a float32 ulp away from
        a point that a second round trip keeps (about 3 % of random values; the
        usual ones such as 0.1 or 0.3 are kept at once), so the trip is repeated
        until it is: then reset(self.init) is the identity, however many times
        stage 2 or a resume calls it."""
        for _ in range(4):
            value = float(self.activation(torch.tensor(self.inverse(alpha))))
            if value == alpha:
                break
            alpha = value
        return alpha

    def regularizer(self) -> torch.Tensor:
        """R of the current alphas (trainable ones in the graph of w, fixed ones
        as constants), each chunk weighted by its share of its tensor."""
        return regularizer(self.alphas(), self.init, self.shares, self.fixed)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.raw.values())

    def alphas(self) -> dict[str, torch.Tensor]:
        """Trainable coefficients after the activation, [K, m] each, in the graph of w."""
        return {name: self.activation(w) for name, w in self.raw.items()}

    @torch.no_grad()
    def all_alphas(self) -> dict[str, torch.Tensor]:
        """Every weight's coefficients, trainable and fixed, detached on the CPU."""
        merged = {**self.frozen_alphas, **self.fixed, **self.alphas()}
        return {name: merged[name].detach().cpu() for name in self.task_vectors.names}

    @torch.no_grad()
    def load(self, alphas: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write base + sum_k sum_s alpha[k, s] * tau_k[chunk s] into the model."""
        if alphas is None:
            alphas = {**self.frozen_alphas, **self.fixed, **self.alphas()}
        else:
            alphas = {**self.frozen_alphas, **alphas}
        for name, weight in self.weights.items():
            merged = self.task_vectors.base(name, weight.device).clone()
            coefficient = alphas[name].to(merged)
            for k, tau in enumerate(self.task_vectors.rows(name, weight.device)):
                merged.addcmul_(tau, expand_chunks(coefficient[k], merged.numel()))
            weight.copy_(merged.view_as(weight))

    @torch.no_grad()
    def load_alphas(self, alphas: Mapping[str, torch.Tensor]) -> None:
        """Set the trainable coefficients to ``alphas`` (after the activation) and
        load their merged weights; a coefficient equal to its current alpha keeps
        its raw value bit for bit."""
        current = self.alphas()
        for name, w in self.raw.items():
            target = alphas[name].to(w)
            w.copy_(
                torch.where(target == current[name], w, self.inverse_tensor(target))
            )
        self.load()

    @torch.no_grad()
    def load_raw(self, raw: Mapping[str, torch.Tensor]) -> None:
        """Set the raw coefficients to saved values and load their merged weights."""
        for name, w in self.raw.items():
            w.copy_(raw[name])
        self.load()

    @torch.no_grad()
    def set_uniform(self, value: float) -> None:
        """Load plain task arithmetic with every coefficient equal to ``value``."""
        k = self.task_vectors.experts
        self.load({name: torch.full((k, 1), value) for name in self.task_vectors.names})

    def zero_grad(self) -> None:
        for weight in self.weights.values():
            weight.grad = None
        for w in self.raw.values():
            w.grad = None

    @torch.no_grad()
    def projected_grads(self) -> dict[str, torch.Tensor]:
        """dL/dalpha [K, m] from the accumulated weight gradients."""
        result = {}
        for name, raw in self.raw.items():
            weight = self.weights[name]
            m = raw.shape[1]
            grad = weight.grad
            if grad is None:
                result[name] = torch.zeros_like(self.raw[name])
                continue
            grad = grad.reshape(-1).to(torch.float32)
            if m == 1 and isinstance(self.task_vectors, ResidentTaskVectors):
                # A matrix-vector product: no [K, numel] temporary.
                result[name] = (self.task_vectors.stacked(name, grad.device) @ grad)[
                    :, None
                ]
            elif m == 1:
                result[name] = torch.stack(
                    [
                        torch.dot(tau, grad)
                        for tau in self.task_vectors.rows(name, grad.device)
                    ]
                )[:, None]
            else:
                result[name] = torch.stack(
                    [
                        reduce_chunks(tau * grad, m)
                        for tau in self.task_vectors.rows(name, grad.device)
                    ]
                )
        return result

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden_layers: Sequence[int],
        inputs: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [T, V] and the selected hidden states [T, D] of one sequence.

        ``inputs``: further model inputs with a batch dimension (pixel values...).
        """
        device = self.device
        extra = {k: v.to(device) for k, v in (inputs or {}).items()}
        with self.autocast():
            output = self.model(
                input_ids=input_ids[None].to(device),
                **extra,
                output_hidden_states=bool(hidden_layers),
                use_cache=False,
            )
        hidden = (
            [output.hidden_states[i][0] for i in hidden_layers] if hidden_layers else []
        )
        return output.logits[0], hidden

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_hidden_layers(layers: Sequence[int], n_blocks: int) -> list[int]:
    """Hidden-state indices 0..n_blocks (HF numbering, 0 = embeddings); a
    negative one counts from the end as in Python (-1: the last hidden state),
    so one config names the same depth on models of any size."""
    resolved = []
    for layer in layers:
        if not -(n_blocks + 1) <= layer <= n_blocks:
            raise ExpertMergingError(
                f"calibration.hidden_layers contains {layer}, but the model has "
                f"{n_blocks} blocks: valid hidden-state indices are 0..{n_blocks}, "
                f"or -{n_blocks + 1}..-1 counted from the last"
            )
        resolved.append(layer if layer >= 0 else n_blocks + 1 + layer)
    return resolved
