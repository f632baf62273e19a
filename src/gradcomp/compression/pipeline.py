"""`build(spec)` -> `Pipeline`: stages applied left to right, with error feedback and the
privacy-order checks that make a spec refuse to build when it would void its guarantee.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gradcomp.compression.kinds import Dense, Sparse
from gradcomp.compression.payload import Payload, index_dtype_for
from gradcomp.compression.spec import PrivacyOrderError, SpecError, split_stages
from gradcomp.compression.stages import (
    DP,
    Cast,
    Chooser,
    ErrorFeedback,
    NoneStage,
    PowerSGD,
    RandomK,
    Stage,
    StepContext,
    Work,
    make_stage,
)
from gradcomp.keyed_random import KeyedStream

SpecLike = str | Sequence[Any] | None


def parse_spec(spec: SpecLike) -> list[Stage]:
    """Parse and validate a spec (string or list form) into stages, order checks included."""
    stages = [make_stage(name, args, kwargs) for name, args, kwargs in split_stages(spec)]
    check_order(stages)
    return stages


def check_order(stages: list[Stage]) -> None:
    names = [s.name for s in stages]
    if any(isinstance(s, NoneStage) for s in stages) and len(stages) > 1:
        raise SpecError(f"'none' means no compression and must stand alone, got {' | '.join(names)}")
    if any(isinstance(s, PowerSGD) for s in stages) and len(stages) > 1:
        raise SpecError(
            f"'powersgd' runs torch's PowerSGD hook, which keeps its own error feedback "
            f"(powersgd(error_feedback=true)) and sends its own low-rank factors, so it must stand "
            f"alone, got {' | '.join(names)}"
        )
    for role, what in (
        ("select", "selection stage (topk, randomk, rtopk)"),
        ("privacy", "dp stage"),
        ("cast", "precision stage (fp16, bf16)"),
        ("feedback", "ef stage"),
    ):
        found = [s.name for s in stages if s.role == role]
        if len(found) > 1:
            raise SpecError(f"at most one {what} per pipeline, got {', '.join(found)}")
    for i, s in enumerate(stages):
        if isinstance(s, ErrorFeedback) and i != len(stages) - 1:
            raise SpecError("'ef' must be the last stage: it keeps the residual of everything before it")
    for s in stages:
        s.check_pipeline(stages)
    dp_at = next((i for i, s in enumerate(stages) if isinstance(s, DP)), None)
    if dp_at is None:
        return
    for s in stages[:dp_at]:
        if s.data_dependent:
            rest = " | ".join(x.to_spec() for x in stages if x is not s and not isinstance(x, ErrorFeedback))
            ef = " | ef" if any(isinstance(x, ErrorFeedback) for x in stages) else ""
            raise PrivacyOrderError(
                f"'{s.name}' before 'dp' chooses coordinates by the magnitude of the un-noised "
                f"values, which leaks data outside the DP guarantee. Put the selection after "
                f"the noise, e.g. '{rest} | {s.to_spec()}{ef}', or use randomk (data-independent, "
                f"shared seed) before dp."
            )


class Pipeline:
    """A built compression pipeline. Holds error-feedback memory and step counters per key.

    `compress(tensor, key)` -> payload; `decompress(payload)` -> dense tensor of the input's
    shape and dtype. Randomness comes from `seed`, so runs are reproducible; `randomk`
    positions depend only on its own seed, the key and the key's step count, so every
    worker that compresses the same keys in the same order picks the same positions.
    With `noise_key` the dp stage's noise comes from a `KeyedStream` under that key instead:
    reproducible only by whoever holds the key (a federated client's local DP noise).
    """

    def __init__(self, stages: list[Stage], seed: int = 0, noise_key: bytes | None = None):
        check_order(stages)
        self.stages = stages
        self.seed = seed
        self._noise = KeyedStream(noise_key) if noise_key is not None else None
        self.ef = any(isinstance(s, ErrorFeedback) for s in stages)
        work_stages = [s for s in stages if not isinstance(s, ErrorFeedback | NoneStage)]
        dp_at = max((i for i, s in enumerate(work_stages) if isinstance(s, DP)), default=-1)
        # EF compensates every lossy stage after the privacy stage; memory is post-noise,
        # so keeping it is post-processing and costs no privacy.
        self._before_dp, self._post = work_stages[: max(dp_at, 0)], work_stages[dp_at + 1 :]
        dp = work_stages[dp_at] if dp_at >= 0 else None
        self._dp: DP | None = dp if isinstance(dp, DP) else None
        self._memory: dict[str, torch.Tensor] = {}
        self._steps: dict[str, int] = {}
        self._generators: dict[str, torch.Generator] = {}

    # --- introspection used by collectives and accounting -------------------------------
    @property
    def spec(self) -> str:
        return " | ".join(s.to_spec() for s in self.stages)

    @property
    def selection(self) -> Stage | None:
        return next((s for s in self.stages if s.role == "select"), None)

    @property
    def leader(self) -> bool:
        """True when one rank per step picks the positions for all (`share=leader`)."""
        return bool(getattr(self.selection, "leader", False))

    @property
    def shared_indices(self) -> bool:
        """True when every worker uses the same positions in a step (seeded randomk, leader mode)."""
        return isinstance(self.selection, RandomK) or self.leader

    @property
    def lowrank(self) -> PowerSGD | None:
        """The `powersgd` stage, when this spec runs torch's PowerSGD hook instead of stages."""
        return next((s for s in self.stages if isinstance(s, PowerSGD)), None)

    @property
    def collective_only(self) -> str | None:
        """Why this spec needs a data-parallel collective (None when it works on any tensor)."""
        if self.lowrank is not None:
            return "'powersgd' compresses DDP gradient buckets through torch's hook"
        if self.leader:
            return "share=leader needs the ranks of a collective to agree on one rank's positions"
        return None

    @property
    def dp(self) -> DP | None:
        return next((s for s in self.stages if isinstance(s, DP)), None)

    @property
    def is_identity(self) -> bool:
        return all(isinstance(s, NoneStage | ErrorFeedback) for s in self.stages)

    def kept(self, numel: int) -> int:
        """Values a payload carries for a tensor of `numel` elements (fixed per size)."""
        sel = self.selection
        return sel.kept(numel) if sel is not None else numel

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        cast = next((s for s in self.stages if isinstance(s, Cast)), None)
        return cast.target if cast is not None else dtype

    # --- the work ---------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(str(device))
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[str(device)] = gen
        return gen

    def compress(self, tensor: torch.Tensor, key: str = "default", choose: Chooser | None = None) -> Payload:
        """Compress `tensor` (not modified). `key` names the error-feedback memory to use.

        `choose` (leader mode, given by the collective) agrees the step's positions across
        ranks; it is called once, after error feedback, with k and this rank's own selection.
        """
        return self.compress_update({key: tensor}, choose)[key]

    def compress_update(self, tensors: Mapping[str, torch.Tensor], choose: Chooser | None = None) -> dict[str, Payload]:
        """Compress several tensors (one per key) as one update, e.g. a model's parameters.

        The dp stage clips and noises them *jointly*: its L2 (or L1) clip bounds the norm of the
        whole update, which is the sensitivity the accountant is charged for. A dp stage run
        per tensor would let an update of L tensors reach clip * sqrt(L). Every other stage
        works per key, exactly as `compress` does.
        """
        if self.lowrank is not None:
            raise SpecError(f"{self.collective_only}; it has no per-tensor compress")
        if not (self._before_dp or self._dp or self._post or self.ef):
            return {key: self._passthrough(key, tensor) for key, tensor in tensors.items()}
        works: dict[str, Work] = {}
        contexts: dict[str, StepContext] = {}
        for key, tensor in tensors.items():
            step = self._count_step(key, tensor)
            contexts[key] = ctx = StepContext(key, step, self._generator(tensor.device), choose, self._noise)
            compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            flat = tensor.detach().reshape(-1)
            work = Work(flat.to(compute), None, flat.numel(), tensor.dtype)
            for stage in self._before_dp:
                work = stage.apply(work, ctx)
            works[key] = work
        if self._dp is not None and works:
            works = _joint(self._dp, works, next(iter(contexts.values())))
        out = {}
        for key, work in works.items():
            if self.ef:
                work = self._with_feedback(work, contexts[key], key)
            else:
                for stage in self._post:
                    work = stage.apply(work, contexts[key])
            tensor = tensors[key]
            out[key] = self._payload(work, tuple(tensor.shape), tensor.dtype)
        return out

    def _with_feedback(self, work: Work, ctx: StepContext, key: str) -> Work:
        # Length of the EF space: the full tensor, or the positions chosen before dp.
        space = work.values.numel()
        memory = self._memory.get(key)
        if memory is None or memory.numel() != space or memory.device != work.values.device:
            memory = torch.zeros(space, dtype=work.values.dtype, device=work.values.device)
        memory.add_(work.values)  # memory now holds input + old residual
        corrected = Work(memory, None, space, work.wire_dtype)
        out = corrected
        for stage in self._post:
            out = stage.apply(out, ctx)
        sent = out.values.to(out.wire_dtype).to(memory.dtype)  # what the receiver will see
        residual = memory.clone() if out.values is memory else memory
        if out.indices is None:
            residual.sub_(sent)
        else:
            residual.index_add_(0, out.indices, sent, alpha=-1)
        self._memory[key] = residual
        if work.indices is not None and out.indices is not None:
            return dataclasses.replace(out, indices=work.indices.index_select(0, out.indices), numel=work.numel)
        if work.indices is not None:
            return dataclasses.replace(out, indices=work.indices, numel=work.numel)
        return dataclasses.replace(out, numel=work.numel)

    def _count_step(self, key: str, tensor: torch.Tensor) -> int:
        """Check the tensor and advance the key's step counter; returns the step being taken."""
        if not tensor.is_floating_point():
            raise TypeError(f"compression needs a floating-point tensor, got {tensor.dtype} for {key!r}")
        step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        return step

    def _passthrough(self, key: str, tensor: torch.Tensor) -> Dense:
        """A pipeline with no working stage ('none'): the tensor as it is, without the stage machinery
        (the same payload the stages would build, at a fraction of the per-tensor cost)."""
        self._count_step(key, tensor)
        return Dense(tensor.detach().reshape(-1), tuple(tensor.shape), tensor.dtype)

    @staticmethod
    def _payload(work: Work, shape: tuple[int, ...], dtype: torch.dtype) -> Payload:
        if work.encoded is not None:  # a stage with its own payload kind
            return work.encoded(shape, dtype)
        values = work.values.to(work.wire_dtype)
        if work.indices is None:
            return Dense(values, shape, dtype)
        return Sparse(work.indices.to(index_dtype_for(work.numel)), values, shape, dtype)

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Dense tensor of the original shape and dtype (zeros where nothing was sent)."""
        return payload.to_dense()

    # --- error-feedback memory ----------------------------------------------------------
    def residual(self, key: str) -> torch.Tensor | None:
        return self._memory.get(key)

    def reset(self, key: str | None = None) -> None:
        """Forget error-feedback memory (and step counters) for one key or for all."""
        if key is None:
            self._memory.clear()
            self._steps.clear()
        else:
            self._memory.pop(key, None)
            self._steps.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "memory": {k: v.detach().cpu().clone() for k, v in self._memory.items()},
            "steps": dict(self._steps),
            "generators": {d: g.get_state() for d, g in self._generators.items()},
            **({"noise_position": self._noise.position} if self._noise is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("spec") not in (None, self.spec):
            raise ValueError(f"state was saved for spec {state['spec']!r}, not {self.spec!r}")
        self._memory = {k: v.clone() for k, v in state.get("memory", {}).items()}
        self._steps = dict(state.get("steps", {}))
        for device, gen_state in state.get("generators", {}).items():
            self._generator(torch.device(device)).set_state(gen_state)
        if self._noise is not None and "noise_position" in state:
            self._noise = KeyedStream(self._noise.key, int(state["noise_position"]))

    def __repr__(self) -> str:
        return f"Pipeline({self.spec!r}, seed={self.seed})"


def _joint(dp: DP, works: dict[str, Work], ctx: StepContext) -> dict[str, Work]:
    """Apply `dp` to all keys' values as one vector, then split the result back per key."""
    dtype = torch.float64 if any(w.values.dtype == torch.float64 for w in works.values()) else torch.float32
    joined = torch.cat([w.values.to(dtype) for w in works.values()])
    noisy = dp.apply(Work(joined, None, joined.numel(), torch.float32), ctx).values
    out, at = {}, 0
    for key, w in works.items():
        n = w.values.numel()
        out[key] = Work(noisy[at : at + n].to(w.values.dtype), w.indices, w.numel, w.wire_dtype)
        at += n
    return out


def build(spec: SpecLike, seed: int = 0, noise_key: bytes | None = None) -> Pipeline:
    """Build a pipeline from a spec string (`"topk(ratio=0.01) | ef"`) or its YAML-list form."""
    return Pipeline(parse_spec(spec), seed=seed, noise_key=noise_key)
