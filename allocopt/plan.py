"""The plan: which experts each MoE layer keeps. A stable JSON contract (format ``allocopt.plan/1``).

Example::

    plan = Plan.from_counts(model_fingerprint, ranking, counts)   # keep the best counts[l] experts of layer l
    plan.save("plan.json"); Plan.load("plan.json").validate_for(describe(model))

Hand-written plans may leave out ``model_fingerprint``: such a plan is checked against the model it is applied to
(MoE layers, experts per layer, top-k), a one-line warning says only that much could be checked, and from then on
it carries that model's fingerprint (so an export's plan.json is pinned to it).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from allocopt.errors import AllocoptError, json_kind
from allocopt.io import atomic_write_json

if TYPE_CHECKING:
    from allocopt.models.adapter import ModelInfo

PLAN_FORMAT = "allocopt.plan/1"
PLAN_FILE = "plan.json"       # a plan's file name in run directories and pruned checkpoints
_LAYER_FIELDS = ("index", "num_experts", "kept")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    index: int                 # decoder-layer index (dense layers never appear)
    num_experts: int           # routed experts in the unpruned layer
    kept: tuple[int, ...]      # sorted expert ids that survive

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "num_experts": self.num_experts, "kept": list(self.kept)}


@dataclass
class Plan:
    model_fingerprint: str | None                          # None: a hand-written plan, not yet checked against a model
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
        out: dict[str, Any] = {"format": PLAN_FORMAT}
        if self.model_fingerprint is not None:
            out["model_fingerprint"] = self.model_fingerprint
        out.update(self.extra)
        out["layers"] = [lp.to_json() for lp in self.layers]
        return out

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], source: str = "plan") -> "Plan":
        """Parse the JSON contract; every missing or ill-typed field is named (``layer 3 has no "kept"``)."""
        if not isinstance(obj, Mapping) or obj.get("format") != PLAN_FORMAT:
            raise AllocoptError(f"{source} is not an allocopt plan (expected \"format\": \"{PLAN_FORMAT}\"); pass a plan.json written by allocopt")
        fp = obj.get("model_fingerprint")
        if fp is not None and not isinstance(fp, str):
            raise AllocoptError(f'{source}: "model_fingerprint" is {json_kind(fp)}, not a string; give the string '
                                "`allocopt info` prints, or leave the field out")
        if "layers" not in obj:
            raise AllocoptError(f'{source} has no "layers"; list every MoE layer as {{"index": ..., "num_experts": ..., "kept": [...]}}')
        if not isinstance(obj["layers"], list):
            raise AllocoptError(f'{source}: "layers" is {json_kind(obj["layers"])}, not an array; list every MoE layer as '
                                '{"index": ..., "num_experts": ..., "kept": [...]}')
        layers = [_layer_from_json(d, i, source) for i, d in enumerate(obj["layers"])]
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
        if fingerprint is not None and self.model_fingerprint is not None and self.model_fingerprint != fingerprint:
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
        if self.model_fingerprint is None and fingerprint is not None:
            log.warning(f"{source} has no model_fingerprint, so only its MoE layers, expert counts and top-k were checked "
                        f'against this model; add "model_fingerprint": "{fingerprint}" to pin it to this model')
            self.model_fingerprint = fingerprint
        return self


def _layer_from_json(d: object, position: int, source: str) -> LayerPlan:
    """One entry of "layers"; named by its "index" when it has a usable one, else by its position."""
    index = d.get("index") if isinstance(d, Mapping) else None
    name = f"layer {index}" if _is_int(index) else f"layers[{position}]"
    if not isinstance(d, Mapping):
        raise AllocoptError(f'{source}: {name} is {json_kind(d)}, not an object; write {{"index": ..., "num_experts": ..., "kept": [...]}}')
    for key in _LAYER_FIELDS:
        if key not in d:
            raise AllocoptError(f'{source}: {name} has no "{key}"; give every layer "index", "num_experts" and "kept"')
    for key in ("index", "num_experts"):
        if not _is_int(d[key]):
            raise AllocoptError(f'{source}: {name} "{key}" is {_shown(d[key])}, not an integer; write a whole number')
    if not isinstance(d["kept"], list):
        raise AllocoptError(f'{source}: {name} "kept" is {json_kind(d["kept"])}, not an array; list the kept expert ids, e.g. [0, 3, 5]')
    for e in d["kept"]:
        if not _is_int(e):
            raise AllocoptError(f'{source}: {name} "kept" holds {_shown(e)}, not an expert id; list integer expert ids only')
    return LayerPlan(d["index"], d["num_experts"], tuple(d["kept"]))


def _shown(value: object) -> str:
    """A JSON value in a message: ``null``, ``a string "8"``, ``a number 3.5``."""
    return "null" if value is None else f"{json_kind(value)} {json.dumps(value)}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
