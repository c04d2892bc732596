"""The plan: which experts each MoE layer keeps. A stable JSON contract (format ``allocopt.plan/1``).

Example::

    plan = Plan.from_counts(model_fingerprint, ranking, counts)   # keep the best counts[l] experts of layer l
    plan.save("plan.json"); Plan.load("plan.json").validate_for(describe(model))
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from allocopt.errors import AllocoptError
from allocopt.io import atomic_write_json

if TYPE_CHECKING:
    from allocopt.models.adapter import ModelInfo

PLAN_FORMAT = "allocopt.plan/1"
PLAN_FILE = "plan.json"       # a plan's file name in run directories and pruned checkpoints


@dataclass(frozen=True)
class LayerPlan:
    index: int                 # decoder-layer index (dense layers never appear)
    num_experts: int           # routed experts in the unpruned layer
    kept: tuple[int, ...]      # sorted expert ids that survive

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "num_experts": self.num_experts, "kept": list(self.kept)}


@dataclass
class Plan:
    model_fingerprint: str
    layers: list[LayerPlan]
    extra: dict[str, Any] = field(default_factory=dict)   # esap, optimizer, criterion, ... (free-form)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_counts(cls, model_fingerprint: str, ranking: Mapping[int, Sequence[int]],
                    num_experts: Mapping[int, int], counts: Mapping[int, int], **extra: Any) -> "Plan":
        """Keep the ``counts[l]`` highest-ranked experts of every layer (``ranking[l]`` is best-first)."""
        layers = [LayerPlan(l, int(num_experts[l]), tuple(sorted(int(e) for e in ranking[l][: int(counts[l])])))
                  for l in sorted(counts)]
        return cls(model_fingerprint, layers, dict(extra))

    @classmethod
    def identity(cls, model_fingerprint: str, num_experts: Mapping[int, int]) -> "Plan":
        return cls(model_fingerprint, [LayerPlan(l, int(e), tuple(range(int(e)))) for l, e in sorted(num_experts.items())])

    # ---- views ----------------------------------------------------------------------------------
    @property
    def kept(self) -> dict[int, tuple[int, ...]]:
        return {lp.index: lp.kept for lp in self.layers}

    @property
    def counts(self) -> list[int]:
        return [len(lp.kept) for lp in self.layers]

    def pruned(self) -> dict[int, list[int]]:
        return {lp.index: sorted(set(range(lp.num_experts)) - set(lp.kept)) for lp in self.layers}

    # ---- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": PLAN_FORMAT, "model_fingerprint": self.model_fingerprint}
        out.update(self.extra)
        out["layers"] = [lp.to_json() for lp in self.layers]
        return out

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], source: str = "plan") -> "Plan":
        if not isinstance(obj, Mapping) or obj.get("format") != PLAN_FORMAT:
            raise AllocoptError(f"{source} is not an allocopt plan (expected \"format\": \"{PLAN_FORMAT}\"); pass a plan.json written by allocopt")
        try:
            layers = [LayerPlan(int(d["index"]), int(d["num_experts"]), tuple(int(e) for e in d["kept"])) for d in obj["layers"]]
            fp = str(obj["model_fingerprint"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AllocoptError(f"{source} is malformed ({exc!r}); each layer needs index, num_experts and kept") from exc
        extra = {k: v for k, v in obj.items() if k not in ("format", "model_fingerprint", "layers")}
        plan = cls(fp, layers, extra)
        plan.check_shape(source)
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise AllocoptError(f"plan file {path} does not exist; pass the plan.json written by `allocopt run`") from exc
        except json.JSONDecodeError as exc:
            raise AllocoptError(f"plan file {path} is not valid JSON ({exc.msg} at line {exc.lineno}); regenerate it with `allocopt run`") from exc
        return cls.from_json(obj, source=f"plan file {path}")

    # ---- validation --------------------------------------------------------------------------------
    def check_shape(self, source: str = "plan") -> None:
        """Checks that need no model: ascending layers, ids in range, no duplicates."""
        idx = [lp.index for lp in self.layers]
        if idx != sorted(set(idx)):
            raise AllocoptError(f"{source}: layer indices must be unique and ascending, got {idx}; fix the plan's \"layers\" list")
        for lp in self.layers:
            if len(set(lp.kept)) != len(lp.kept):
                raise AllocoptError(f"{source}: layer {lp.index} keeps duplicate expert ids; list each kept expert once")
            bad = [e for e in lp.kept if not 0 <= e < lp.num_experts]
            if bad:
                raise AllocoptError(f"{source}: layer {lp.index} keeps expert ids {bad} outside 0..{lp.num_experts - 1}; use ids of the unpruned model")
            if list(lp.kept) != sorted(lp.kept):
                object.__setattr__(lp, "kept", tuple(sorted(lp.kept)))

    def validate_for(self, info: "ModelInfo", source: str = "plan") -> "Plan":
        """:meth:`validate` against ``describe(model)``, plus what each layer's router needs to route the pruned
        layer exactly (group-limited routing keeps equal groups, hash-routed layers keep every expert): what every
        command that applies a plan checks first."""
        from allocopt.models.adapter import kept_problem

        self.validate(info.num_experts, info.top_k, info.fingerprint, source=source)
        by_index = {l.index: l for l in info.layers}
        for lp in self.layers:
            problem = kept_problem(by_index[lp.index], lp.kept)
            if problem:
                raise AllocoptError(f"{source}: layer {lp.index} {problem}; keep a plan that the pruned model can route "
                                    "(allocopt run only writes such plans)")
        return self

    def validate(self, num_experts: Mapping[int, int], top_k: Mapping[int, int], fingerprint: str | None = None,
                 source: str = "plan") -> "Plan":
        """Check the plan against a model description: same fingerprint, same MoE layers, >= top-k kept."""
        self.check_shape(source)
        if fingerprint is not None and self.model_fingerprint != fingerprint:
            raise AllocoptError(f"{source} was made for another model (fingerprint {self.model_fingerprint[:12]} != {fingerprint[:12]}); "
                                "search a plan for this model or pass the model the plan was made for")
        want = sorted(num_experts)
        have = [lp.index for lp in self.layers]
        if have != want:
            raise AllocoptError(f"{source} covers MoE layers {have} but the model has MoE layers {want}; use a plan made for this model")
        for lp in self.layers:
            if lp.num_experts != num_experts[lp.index]:
                raise AllocoptError(f"{source}: layer {lp.index} says {lp.num_experts} experts, the model has {num_experts[lp.index]}; use a plan made for this model")
            if len(lp.kept) < top_k[lp.index]:
                raise AllocoptError(f"{source}: layer {lp.index} keeps {len(lp.kept)} experts, fewer than its top-k {top_k[lp.index]}; keep at least top-k experts per layer")
        return self
