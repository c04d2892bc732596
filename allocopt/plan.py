"""The plan: which experts each MoE layer keeps. A stable JSON contract (format ``allocopt.plan/1``).

Example::

    plan = Plan.from_counts(model_fingerprint, ranking, counts)   # keep the best counts[l] experts of layer l
    plan.save("plan.json"); Plan.load("plan.json").validate_for(describe(model))

Hand-written plans may leave out ``model_fingerprint``: such a plan is checked against the model it is applied to
(MoE layers, experts per layer, top-k), a one-line warning says only that much could be checked, and from then on
it carries that model's fingerprint (so an export's plan.json is pinned to it).

Plan legality is one rule, here: :func:`kept_problem` says what is wrong with one layer's kept ids and
:func:`check_kept` applies it to a plan's layers; every stage that takes a plan (masking, the evaluator, export,
padding, the CLI) calls :func:`check_kept` or :meth:`Plan.validate_for`, so a plan is refused with the same words
wherever it enters.
"""
from __future__ import annotations

import json
import logging
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from allocopt.errors import AllocoptError, json_kind
from allocopt.io import atomic_write_json, read_json

PLAN_FORMAT = "allocopt.plan/1"
PLAN_FILE = "plan.json"       # a plan's file name in run directories and pruned checkpoints
_LAYER_FIELDS = ("index", "num_experts", "kept")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    index: int                 # decoder-layer index (dense layers never appear)
    num_experts: int           # routed experts in the unpruned layer
    kept: tuple[int, ...]      # sorted expert ids that survive
    bits: int | None = None    # bit-width of the kept routed experts' weights (None: the checkpoint's precision)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "num_experts": self.num_experts, "kept": list(self.kept)}
        if self.bits is not None:
            out["bits"] = self.bits
        return out


@dataclass
class Plan:
    model_fingerprint: str | None                          # None: a hand-written plan, not yet checked against a model
    layers: list[LayerPlan]
    extra: dict[str, Any] = field(default_factory=dict)   # esap, optimizer, criterion, ... (free-form)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_counts(cls, model_fingerprint: str, ranking: Mapping[int, Sequence[int]],
                    num_experts: Mapping[int, int], counts: Mapping[int, int], bits: Mapping[int, int | None] | None = None,
                    **extra: Any) -> "Plan":
        """Keep the ``counts[l]`` highest-ranked experts of every layer (``ranking[l]`` is best-first), their weights
        at ``bits[l]`` where given (None or absent: the checkpoint's precision)."""
        bits = bits or {}
        layers = [LayerPlan(l, int(num_experts[l]), tuple(sorted(int(e) for e in ranking[l][: int(counts[l])])),
                            None if bits.get(l) is None else int(bits[l]))
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

    @property
    def bits(self) -> dict[int, int]:
        """Bit-width of each quantized layer (layers at the checkpoint's precision are absent)."""
        return {lp.index: lp.bits for lp in self.layers if lp.bits is not None}

    def objective_value(self) -> tuple[str, float | None, float | None]:
        """``(objective, value, uniform value)`` recorded by ``allocopt run`` (None where not recorded). Plans written
        before the objective's name was recorded stored every objective's value under ``esap``/``uniform_esap``."""
        return objective_value(self.extra)

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
        plan.check_summary(source)
        return plan

    @classmethod
    def load(cls, path: str | Path, source: str | None = None, remedy: str = "regenerate it with `allocopt run`"
             ) -> "Plan":
        """The plan in ``path``; errors name it as ``source`` (default "plan file PATH") and advise ``remedy`` for a
        file that is not JSON (an export's own plan.json is regenerated by `allocopt prune`, not `run`)."""
        path = Path(path)
        source = source or f"plan file {path}"
        try:
            obj = read_json(path, source, remedy)
        except FileNotFoundError as exc:
            raise AllocoptError(f"plan file {path} does not exist; pass the plan.json written by `allocopt run`") from exc
        except OSError as exc:                       # a directory, no read permission, ...
            raise AllocoptError(f"cannot read plan file {path} ({exc.strerror}); pass the plan.json written by "
                                "`allocopt run`") from exc
        return cls.from_json(obj, source=source)

    # ---- validation --------------------------------------------------------------------------------
    def check_summary(self, source: str = "plan") -> None:
        """The summary fields that restate the layers (``counts``, ``bits``, as `allocopt run` writes them) agree
        with them: a hand-edited plan whose summary says one thing and its layers another is refused rather than
        exported as the layers say and copied on with the contradiction."""
        restated = {"counts": [len(lp.kept) for lp in self.layers], "bits": [lp.bits for lp in self.layers]}
        for key, truth in restated.items():
            if key in self.extra and self.extra[key] != truth:
                raise AllocoptError(f'{source}: "{key}" {self.extra[key]} disagrees with its layers ({truth}); edit '
                                    f'the layers and remove "{key}" (or make it match)')

    def check_shape(self, source: str = "plan") -> None:
        """Checks that need no model: ascending layers, ids in range, no duplicates."""
        idx = [lp.index for lp in self.layers]
        if idx != sorted(set(idx)):
            raise AllocoptError(f"{source}: layer indices must be unique and ascending, got {idx}; fix the plan's \"layers\" list")
        for lp in self.layers:
            problem = _ids_problem(lp.num_experts, lp.kept)
            if problem:
                raise AllocoptError(f"{source}: layer {lp.index} {problem}")
            if lp.bits is not None:
                check_bits([lp.bits], f"{source}: layer {lp.index}")
            if list(lp.kept) != sorted(lp.kept):
                object.__setattr__(lp, "kept", tuple(sorted(lp.kept)))

    def validate_for(self, info: Any, source: str = "plan") -> "Plan":
        """Check the plan against ``describe(model)`` (an ``allocopt.models.ModelInfo``): the same fingerprint, the
        same MoE layers and expert counts, and :func:`check_kept` (top-k and what each router needs to route the
        pruned layer exactly): what every command that applies a plan checks first."""
        return self._check_against(info.layers, info.fingerprint, source)

    def check_count_multiple(self, multiple: int, source: str = "plan") -> "Plan":
        """Every layer keeps a multiple of ``multiple`` experts (a serving constraint: the expert-parallel size, or
        what an engine's kernel accepts; ``allocopt run --count-multiple`` searches only such plans). Raises one
        AllocoptError naming the first layer that does not and the fix."""
        if multiple < 1:
            raise AllocoptError(f"--count-multiple must be >= 1, got {multiple}; raise it")
        for lp in self.layers:
            if len(lp.kept) % multiple:
                raise AllocoptError(f"{source}: layer {lp.index} keeps {len(lp.kept)} experts, not a multiple of "
                                    f"--count-multiple {multiple}; search with `allocopt run --count-multiple {multiple}` "
                                    "or edit the plan")
        return self

    def check_allowed_counts(self, counts, source: str = "plan") -> "Plan":
        """Every layer keeps one of ``counts`` experts (what a serving kernel accepts; ``allocopt run
        --allowed-counts`` searches only such plans). Raises one AllocoptError naming the first layer that does not."""
        allowed = check_allowed_counts(counts)
        shown = ",".join(map(str, allowed))
        for lp in self.layers:
            if len(lp.kept) not in allowed:
                raise AllocoptError(f"{source}: layer {lp.index} keeps {len(lp.kept)} experts, not one of --allowed-counts "
                                    f"{shown}; search with `allocopt run --allowed-counts {shown}` or edit the plan")
        return self

    def validate(self, num_experts: Mapping[int, int], top_k: Mapping[int, int], fingerprint: str | None = None,
                 source: str = "plan") -> "Plan":
        """:meth:`validate_for` from expert counts and top-k alone (a model description without router needs)."""
        layers = [LayerLimits(int(l), int(n), int(top_k[l])) for l, n in sorted(num_experts.items())]
        return self._check_against(layers, fingerprint, source)

    def _check_against(self, layers: Iterable["LayerRules"], fingerprint: str | None, source: str) -> "Plan":
        layers = list(layers)
        self.check_shape(source)
        if fingerprint is not None and self.model_fingerprint is not None and self.model_fingerprint != fingerprint:
            raise AllocoptError(f"{source} was made for another model (fingerprint {self.model_fingerprint[:12]} != {fingerprint[:12]}); "
                                "search a plan for this model or pass the model the plan was made for")
        want = sorted(l.index for l in layers)
        have = [lp.index for lp in self.layers]
        if have != want:
            raise AllocoptError(f"{source} covers MoE layers {have} but the model has MoE layers {want}; use a plan made for this model")
        experts = {l.index: l.num_experts for l in layers}
        for lp in self.layers:
            if lp.num_experts != experts[lp.index]:
                raise AllocoptError(f"{source}: layer {lp.index} says {lp.num_experts} experts, the model has "
                                    f"{experts[lp.index]}; use a plan made for this model")
        check_kept(layers, self.kept, source)
        if self.model_fingerprint is None and fingerprint is not None:
            log.warning(f"{source} has no model_fingerprint, so only its MoE layers, expert counts and top-k were checked "
                        f'against this model; add "model_fingerprint": "{fingerprint}" to pin it to this model')
            self.model_fingerprint = fingerprint
        return self


# ---- the plan-legality rule -------------------------------------------------------------------------

class LayerRules(Protocol):
    """What a plan must respect in one MoE layer (``allocopt.models.MoELayerInfo`` is one)."""

    index: int                 # decoder-layer index
    num_experts: int           # routed experts in the unpruned layer
    top_k: int                 # experts each token is routed to
    groups: int                # group-limited routing: equal groups of experts (1 without)
    min_kept: int              # fewest experts the router routes exactly with (>= top_k; all for hash routing)

    @property
    def routing_note(self) -> str: ...


@dataclass(frozen=True)
class LayerLimits:
    """A layer known only by its expert count and top-k (no router constraints): :meth:`Plan.validate`."""

    index: int
    num_experts: int
    top_k: int
    groups: int = 1
    min_kept: int = 0
    routing_note: str = ""


def kept_problem(layer: LayerRules, kept: Sequence[int]) -> str | None:
    """Why ``kept`` cannot be the experts ``layer`` keeps, as "keeps ...; <fix>" (None when it can): ids in range
    and distinct, at least top-k, and what the router needs (a hash-routed layer keeps all its experts; group-limited
    routing keeps the same number in every group, at least what the group score reads)."""
    problem = _ids_problem(layer.num_experts, kept)
    if problem:
        return problem
    n, count = layer.num_experts, len(kept)
    if count < layer.top_k:
        return f"keeps {count} experts, fewer than its top-k {layer.top_k}; keep at least top-k experts per layer"
    if count < n and layer.min_kept >= n:
        return f"keeps {count} of {n} experts, but it is {layer.routing_note}; {_ROUTABLE}"
    if layer.groups > 1 and count < n:
        size = n // layer.groups
        per_group = [sum(1 for e in kept if int(e) // size == g) for g in range(layer.groups)]
        if len(set(per_group)) > 1 or per_group[0] < layer.min_kept // layer.groups:
            return f"uses {layer.routing_note}, and the plan keeps {per_group} experts per group; {_ROUTABLE}"
    return None


_ROUTABLE = "keep a plan that the pruned model can route (allocopt run only writes such plans)"


def check_kept(layers: Iterable[LayerRules], kept: Mapping[int, Sequence[int]], source: str = "plan",
               model: str = "the model") -> dict[int, list[int]]:
    """The plan-legality rule for ``kept`` (layer -> kept expert ids; layers left out keep every expert) on a model
    whose MoE layers are ``layers``: every named layer is an MoE layer and :func:`kept_problem` finds nothing.
    Returns the kept ids as sorted int lists; raises one AllocoptError naming the layer and the fix otherwise."""
    by_index = {l.index: l for l in layers}
    named = {int(l): ids for l, ids in kept.items()}
    unknown = sorted(set(named) - set(by_index))
    if unknown:
        raise AllocoptError(f"{source}: layers {unknown} are not MoE layers of {model} (MoE layers: {sorted(by_index)}); "
                            "use decoder-layer indices from `allocopt info`")
    out = {}
    for layer, ids in sorted(named.items()):
        ids = [int(e) for e in ids]
        problem = kept_problem(by_index[layer], ids)
        if problem:
            raise AllocoptError(f"{source}: layer {layer} {problem}")
        out[layer] = sorted(ids)
    return out


def _ids_problem(num_experts: int, kept: Sequence[int]) -> str | None:
    ids = [int(e) for e in kept]
    if len(set(ids)) != len(ids):
        return "keeps duplicate expert ids; list each kept expert once"
    bad = sorted(e for e in ids if not 0 <= e < num_experts)
    if bad:
        return f"keeps expert ids {bad} outside 0..{num_experts - 1}; use ids of the unpruned model"
    return None


def objective_value(fields: Mapping[str, Any]) -> tuple[str, float | None, float | None]:
    """:meth:`Plan.objective_value` of a plan's top-level fields (plan.json as a dict, or ``RunResult.summary``)."""
    objective = str(fields.get("objective", "esap"))
    value = fields.get("value", fields.get(objective, fields.get("esap")))
    uniform = fields.get("uniform_value", fields.get(f"uniform_{objective}", fields.get("uniform_esap")))
    return objective, None if value is None else float(value), None if uniform is None else float(uniform)


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
    bits = d.get("bits")
    if bits is not None and not _is_int(bits):
        raise AllocoptError(f'{source}: {name} "bits" is {_shown(bits)}, not an integer; write one of '
                            f'{", ".join(map(str, SUPPORTED_BITS))}, or leave it out for the checkpoint\'s precision')
    return LayerPlan(d["index"], d["num_experts"], tuple(d["kept"]), bits)


def _shown(value: object) -> str:
    """A JSON value in a message: ``null``, ``a string "8"``, ``a number 3.5``."""
    return "null" if value is None else f"{json_kind(value)} {json.dumps(value)}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SUPPORTED_BITS = (4, 8)       # int weight-only levels vLLM serves from compressed-tensors checkpoints (W4A16, W8A16)


def check_bits(bits, source: str = "--bits") -> tuple[int, ...]:
    """The one rule for the bit-widths of routed experts: each one of :data:`SUPPORTED_BITS`. Accepts ints or text such
    as ``"8,4"``; returns them sorted, distinct; raises one AllocoptError naming the bad value and the fix."""
    if isinstance(bits, str):
        try:
            bits = [int(b) for b in bits.replace(" ", "").split(",") if b]
        except ValueError:
            raise AllocoptError(f"{source}: bit-widths {bits!r} are not whole numbers; give them as e.g. 8,4") from None
    out = []
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or int(b) not in SUPPORTED_BITS:
            raise AllocoptError(f"{source}: bit-width {b!r} is not one allocopt quantizes experts to; use "
                                f"{' or '.join(map(str, SUPPORTED_BITS))} (int weight-only, group-wise), or leave the "
                                "layer at the checkpoint's precision")
        out.append(int(b))
    return tuple(sorted(set(out)))


def require_compressed_tensors() -> None:
    """Plans with bits are scored and exported with compressed-tensors (the ``quantize`` extra); one line if absent."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise AllocoptError("quantizing experts (--bits, a plan with bits) needs compressed-tensors; install it with "
                            "pip install 'allocopt[quantize]' (in a clone: pip install -e '.[quantize]')")


def check_allowed_counts(counts) -> tuple[int, ...]:
    """``--allowed-counts`` as a sorted tuple of distinct positive expert counts (the one check; RunConfig, the
    search space and ``allocopt prune`` call it). Accepts a list of ints or text such as ``"64,96,128"``."""
    if isinstance(counts, str):
        try:
            counts = [int(c) for c in counts.replace(" ", "").split(",") if c]
        except ValueError:
            raise AllocoptError(f"allowed counts {counts!r} are not whole numbers; give them as e.g. 64,96,128") from None
    if not counts or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1 for c in counts):
        raise AllocoptError(f"allowed counts must be positive expert counts, got {list(counts)}; give them as e.g. "
                            "64,96,128")
    return tuple(sorted({int(c) for c in counts}))
