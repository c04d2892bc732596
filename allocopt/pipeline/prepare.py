"""What every command that scores plans needs, built in one place: :func:`check_request` (no weights: the model's
config.json is read once for the context-length and budget checks) then :func:`prepare` (the model loaded once, the
routing statistics observed or reused, the criterion parsed and scored once, the search tokens and the evaluator).

Routing statistics are cached in the run directory (and found in sibling run directories with the same model and
calibration data), so trying another criterion or budget on the same model and data never observes again.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from allocopt.config import RunConfig
from allocopt.errors import AllocoptError

STATS_FILE = "calibration.safetensors"
log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A loaded model and everything scoring plans on it needs (``search=False``: no space, statistics or ranking)."""

    config: RunConfig
    model: Any                                   # torch.nn.Module, eval mode
    tokenizer: Any
    info: Any                                    # allocopt.models.ModelInfo
    tokens: Any                                  # the search TokenSet
    evaluator: Any                               # allocopt.objectives.Evaluator
    space: Any = None                            # AllocationSpace in experts (group-limited routing: see lattice())
    size: Any = None                             # allocopt.export.size.ExportSize where the budget is in bytes
    joint: Any = None                            # allocopt.search.joint.JointSpace where bit-widths are searched too
    stats: Any = None                            # RoutingStats
    calibration_reused: bool = False             # statistics came from a cache file
    scores: dict[int, Any] | None = None         # criterion scores per layer [E] (higher = keep)
    ranking: dict[int, list[int]] | None = None  # expert ids per layer, best first
    threads: Any = None                          # runtime.threads.ThreadGovernor (None where the user fixed threads)

    def save_statistics(self) -> None:
        """Store the routing statistics as the run directory's ``calibration.safetensors`` (the cache sibling runs
        reuse), unless it holds them already. ``run_search`` calls this once the study accepted the run, so a refused
        run leaves the directory as it was."""
        target = self.config.run_dir / STATS_FILE
        if _stats_fingerprints(target) != (self.stats.model_fingerprint, self.stats.data_fingerprint):
            self.stats.save(target)

    def kept_for(self, counts: Sequence[int]) -> dict[int, list[int]]:
        """Expert counts in ``space.layers`` order -> each layer's kept ids: the first counts[l] of its ranking."""
        return {l: self.ranking[l][: int(c)] for l, c in zip(self.space.layers, counts)}


def check_request(config: RunConfig):
    """The checks that need no weights, so an impossible request fails before anything loads: the budget on a
    meta-device skeleton, the optimizer's options against it and both sequence lengths against the model's context.
    Returns ``(source, space)``: the ``ModelSource`` (config.json read once, reused by :func:`prepare`) and the
    space in experts (None where only the loaded model tells it: pruned exports, remote code)."""
    from allocopt.export.source_format import refuse_packed_source
    from allocopt.runtime.loading import open_model

    source = open_model(config.model, config.trust_remote_code)
    refuse_packed_source(getattr(source.config, "quantization_config", None), config.model)
    space = peek_space(config, source)
    check_options(config, space)
    config.check_context(source)
    return source, space


def prepare(config: RunConfig, *, search: bool = True, progress: bool = True, exact: bool = False, source: Any = None,
            expect: Mapping[str, Any] | None = None, save_statistics: bool = True,
            check_model: Callable[[Any, Any], None] | None = None) -> Prepared:
    """Load ``config.model`` once and build the search tokens and the evaluator; with ``search`` also the allocation
    space, the routing statistics (cached in the run directory, or later by ``Prepared.save_statistics`` when
    ``save_statistics`` is False), the criterion's scores and the ranking. ``check_model(info, model)`` runs as soon
    as the model is loaded, before calibration (a run refuses a study of other weights there).

    ``expect`` holds a study's ``model_fingerprint``/``search_fingerprint``: a model or search set that differs is
    refused (a worker on other weights would poison the study). ``exact`` keeps the full teacher distribution.
    """
    from allocopt.data import load_tokens
    from allocopt.models import describe
    from allocopt.runtime import load_model
    from allocopt.objectives import Evaluator

    from allocopt.runtime.threads import ThreadGovernor

    model, tokenizer = load_model(config.model if source is None else source, config.load_options())
    threads = ThreadGovernor.for_this_process()
    if threads is not None:
        threads.adjust(wait=True)                    # torch gets the cores other processes leave free
    if tokenizer is None:
        raise AllocoptError(f"model {config.model} has no tokenizer files; add tokenizer.json to the checkpoint directory")
    info = describe(model)
    if expect is not None and info.fingerprint != expect.get("model_fingerprint"):
        from allocopt.models.adapter import legacy_fingerprint

        if expect.get("model_fingerprint") == legacy_fingerprint(model):
            raise AllocoptError("the study was made with allocopt's earlier model fingerprint (router weights only), "
                                "which cannot tell whether its trials were scored on this model; start the search again "
                                "with `allocopt run --name NEW`")
        raise AllocoptError(f"model {config.model} here differs from the one the study was scored with; "
                            "give the worker the same checkpoint")
    if check_model is not None:
        check_model(info, model)
    prepared = Prepared(config, model, tokenizer, info, tokens=None, evaluator=None, threads=threads)
    if search:
        from allocopt.criteria import ranking_from_scores

        prepared.space, prepared.size = space_for(config, info, model)
        prepared.joint = joint_space_for(config, prepared.space, prepared.size)
        prepared.stats, prepared.calibration_reused = calibration_stats(model, tokenizer, info.fingerprint, config, progress)
        if save_statistics:
            prepared.save_statistics()
        prepared.scores = config.criterion_function()(prepared.stats)
        prepared.ranking = ranking_from_scores(prepared.scores, prepared.stats.layers,
                                               {l.index: l.groups for l in info.layers}, config.criterion)
    tokens = load_tokens(config.search_data, tokenizer, config.search_seq_len, config.search_num_seqs, split="search")
    if expect is not None and tokens.fingerprint() != expect.get("search_fingerprint"):
        raise AllocoptError(f"search data {config.search_data} here differs from the study's; give the worker the same data")
    prepared.tokens = tokens
    prepared.evaluator = Evaluator(model, tokens, objective=config.objective, tolerance=config.tolerance, exact=exact)
    return prepared


# ---- budget ----------------------------------------------------------------------------------------

def space_for(config: RunConfig, info, model):
    """The allocation space of ``config``'s budget on a model described by ``info`` (a ModelInfo): per-layer
    floors from top-k and the router's needs, the step every count is a multiple of (group-limited routing's
    group count and ``count_multiple``, their least common multiple) and the counts a layer may keep
    (``allowed_counts``). A budget in bytes (``memory``/``memory_ratio``) becomes the most routed experts whose export
    fits (``allocopt.export.size``, measured on ``model``, which may be a meta skeleton). Returns ``(space, size)``,
    ``size`` the ExportSize of a budget in bytes, else None."""
    from allocopt.search.space import make_space

    unit = math.lcm(info.unit, config.count_multiple)
    bounds = dict(min_density=config.min_density, max_density=config.max_density, min_kept=info.min_kept, unit=unit,
                  allowed_counts=config.allowed_counts)
    if config.memory is None and config.memory_ratio is None:
        return make_space(info.num_experts, info.top_k, info.bytes_per_expert, sparsity=config.sparsity,
                          keep=config.keep, **bounds), None
    from allocopt.export.size import export_size

    size = export_size(model, bits=tuple(config.bits or ()))
    if config.bits:                  # the counts' bounds only: the byte budget is the joint space's (joint_space_for)
        total = sum(info.num_experts.values())
        return make_space(info.num_experts, info.top_k, size.per_expert, keep=total - 1, at_most=True, **bounds), size
    memory = memory_budget(config, size)
    shown = f"memory {config.memory}" if config.memory is not None else f"memory_ratio {config.memory_ratio:g}"
    prunable = {l.index: l.min_kept < l.num_experts for l in info.layers}
    keep = size.kept_for(memory, unit, prunable)
    try:
        if keep < 1 and unit > 1 and size.kept_for(memory, 1, prunable) >= 1:
            raise AllocoptError(f"the {size.kept_for(memory, 1, prunable)} experts it fits round down to none in steps "
                                f"of {unit} (--count-multiple or routing groups); lower --count-multiple or raise the budget")
        if keep < 1:
            raise AllocoptError(f"{memory} bytes do not hold even the parts no plan removes ({size.base} bytes)")
        space = make_space(info.num_experts, info.top_k, size.per_expert, keep=keep, at_most=True, **bounds)
    except AllocoptError as exc:
        raise AllocoptError(f"{shown} ({memory} bytes of export; the unpruned one is {size.full}) holds {max(keep, 0)} "
                            f"routed experts: {exc}") from None
    return space, size


def joint_space_for(config: RunConfig, space, size):
    """With ``bits``: the joint (count, bit-width) space of ``space``'s layers and bounds under the byte budget (the
    checkpoint's precision and each of ``bits``, priced by ``size``); None without."""
    if not config.bits:
        return None
    from allocopt.search.joint import make_joint_space

    shown = f"memory {config.memory}" if config.memory is not None else f"memory_ratio {config.memory_ratio:g}"
    memory = memory_budget(config, size)
    try:
        return make_joint_space(space, (None, *config.bits), size.expert_bytes, size.base, memory)
    except AllocoptError as exc:
        raise AllocoptError(f"{shown} ({memory} bytes of export; the unpruned one is {size.full}): {exc}") from None


def memory_budget(config: RunConfig, size) -> int:
    """A budget in bytes: ``memory``, or ``memory_ratio`` of the unpruned export (``size``: its ExportSize)."""
    return config.memory_bytes() or int(config.memory_ratio * size.full)


def peek_space(config: RunConfig, source):
    """The space from the model's config alone (weights on the meta device), before loading anything; None for
    pruned exports and remote-code models, which are checked right after loading instead."""
    import torch

    from allocopt.models import describe
    from allocopt.runtime.loading import instantiate

    if config.trust_remote_code or source.is_pruned_export:
        return None
    with torch.device("meta"):
        skeleton = instantiate(source.config)
    space, size = space_for(config, describe(skeleton, fingerprint=False), skeleton)
    joint_space_for(config, space, size)                 # an impossible byte budget fails here, before loading
    return space


def check_options(config: RunConfig, space) -> None:
    """The optimizer's own check of ``--option`` values and the budget, before any weights load; ``space`` is in
    experts (None: known only after loading). With ``--bits`` the joint search's options are checked instead. A
    ``--population`` the optimizer does not use is noted (it would change nothing, silently)."""
    from allocopt.search.optimizers import get_optimizer

    if config.bits:
        from allocopt.search.joint import joint_options

        joint_options(config.optimizer, dict(config.options))
        return
    optimizer = get_optimizer(config.optimizer)
    optimizer.check(None if space is None else space.lattice(), config.max_evals, dict(config.options))
    if config.source_of("population") == "command line" and config.generations is None and not optimizer.uses_population:
        log.info(f"{config.optimizer} does not use --population {config.population} (its generations are sized by its "
                 "own options; --population counts only with --generations, as generations x population "
                 "evaluations): it changes nothing in this run")


# ---- calibration -----------------------------------------------------------------------------------

def calibration_stats(model, tokenizer, model_fp: str, config: RunConfig, progress: bool):
    """Routing statistics for (model, calibration data): from a cache when the fingerprints match, else observed.

    Returns ``(stats, reused)``. The cache is this run's ``calibration.safetensors`` or a sibling run's, so
    trying another criterion or budget on the same model and data never observes again; nothing is written here
    (``Prepared.save_statistics`` stores them in the run directory).
    """
    from allocopt.calibration import RoutingStats, observe
    from allocopt.data import load_tokens

    tokens = load_tokens(config.calib_data, tokenizer, config.calib_seq_len, config.calib_num_seqs, split="calibration")
    data_fp = tokens.fingerprint()
    target = config.run_dir / STATS_FILE
    for candidate in [target, *sorted(config.run_dir.parent.glob(f"*/{STATS_FILE}"))]:
        if _stats_fingerprints(candidate) == (model_fp, data_fp):
            return RoutingStats.load(candidate), True
    found = _stats_fingerprints(target)
    if found is not None and found[0] != model_fp:
        log.warning(f"{target} holds statistics observed on another model (fingerprint {str(found[0])[:12]}, this one "
                    f"{model_fp[:12]}; or with an earlier allocopt): observing again")
    return observe(model, tokens, batch_size=config.calib_batch_size, progress=progress), False


def _stats_fingerprints(path: Path) -> tuple[str, str] | None:
    """(model, data) fingerprints from a statistics file's header, without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("allocopt", "{}"))
    except (SafetensorError, OSError, ValueError):
        return None
    return meta.get("model_fingerprint"), meta.get("data_fingerprint")
