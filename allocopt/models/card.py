"""The short README.md model card written beside a pruned checkpoint."""
from __future__ import annotations

from allocopt.models.adapter import ModelInfo
from allocopt.plan import Plan


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def render_card(plan: Plan, before: ModelInfo, after: ModelInfo, source: str) -> str:
    """Markdown: what was pruned, kept experts per layer, ESAP if the plan carries it, memory before/after."""
    kept_total = sum(len(lp.kept) for lp in plan.layers)
    all_total = sum(lp.num_experts for lp in plan.layers)
    lines = [
        f"# {after.architecture} pruned with allocopt", "",
        f"Source model: `{source}` ({before.model_type}, fingerprint `{before.fingerprint[:12]}`).",
        f"Kept {kept_total} of {all_total} routed experts across {len(plan.layers)} MoE layers "
        f"({1 - kept_total / all_total:.1%} removed); shared experts and dense layers are untouched.", "",
    ]
    if "esap" in plan.extra:
        lines += [f"ESAP of this plan against the unpruned model: {plan.extra['esap']}", ""]
    lines += ["| layer | experts before | kept |", "|---:|---:|---:|"]
    lines += [f"| {lp.index} | {lp.num_experts} | {len(lp.kept)} |" for lp in plan.layers]
    lines += ["", f"Memory ({after.dtype}): total {_mb(before.total_bytes)} -> {_mb(after.total_bytes)}, "
              f"routed experts {_mb(before.expert_bytes)} -> {_mb(after.expert_bytes)}.", "",
              "Per-layer expert counts are in `config.layer_num_experts`; load with `allocopt.load_pruned(path)`. "
              "The exact kept expert ids are in `plan.json`.", ""]
    return "\n".join(lines)
