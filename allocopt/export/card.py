"""The short README.md model card written beside a pruned checkpoint."""
from __future__ import annotations

from allocopt.models.adapter import ModelInfo
from allocopt.plan import Plan


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def render_card(plan: Plan, before: ModelInfo, after: ModelInfo, source: str, compact_expert_bytes: int | None = None) -> str:
    """Markdown: what was pruned, kept experts per layer, the searched objective's value if the plan carries it, memory before/after, and which
    loaders load this export. ``compact_expert_bytes`` (padded exports only): routed-expert bytes of the compact one."""
    kept_total = sum(len(lp.kept) for lp in plan.layers)
    all_total = sum(lp.num_experts for lp in plan.layers)
    lines = [
        f"# {after.architecture} pruned with allocopt", "",
        f"Source model: `{source}` ({before.model_type}, fingerprint `{before.fingerprint[:12]}`).",
        f"Kept {kept_total} of {all_total} routed experts across {len(plan.layers)} MoE layers "
        f"({1 - kept_total / all_total:.1%} removed); shared experts and dense layers are untouched.", "",
    ]
    objective, value, _ = plan.objective_value()
    if value is not None:
        name = objective.upper() if objective == "esap" else objective
        lines += [f"{name} of this plan against the unpruned model: {value}", ""]
    lines += ["| layer | experts before | kept |", "|---:|---:|---:|"]
    lines += [f"| {lp.index} | {lp.num_experts} | {len(lp.kept)} |" for lp in plan.layers]
    lines += ["", f"Memory ({after.dtype}): total {_mb(before.total_bytes)} -> {_mb(after.total_bytes)}, "
              f"routed experts {_mb(before.expert_bytes)} -> {_mb(after.expert_bytes)}.", "",
              "The exact kept expert ids are in `plan.json`.", ""]
    return "\n".join(lines + _loading(after, compact_expert_bytes))


def _loading(after: ModelInfo, compact_expert_bytes: int | None) -> list[str]:
    """Which loader loads this export (README: "Which loader loads which export")."""
    from allocopt.models.engines import TESTED_VLLM

    width = max(after.num_experts.values())
    lines = ["## Loading", ""]
    if compact_expert_bytes is not None:
        return lines + [
            f"Padded export: every MoE layer has {width} experts; the ones the plan removed are zero experts whose "
            "router bias is -inf, so they are never chosen and the outputs equal the pruned model's. Stock loaders "
            "load it with no plugin and no remote code: `AutoModelForCausalLM.from_pretrained(path)`, "
            "`vllm serve path`, lm-eval's `hf` and `vllm` models.",
            "", f"Routed experts take {_mb(after.expert_bytes)} here against {_mb(compact_expert_bytes)} in the "
            f"compact export ({after.expert_bytes / compact_expert_bytes:.2f}x).", ""]
    if len(set(after.num_experts.values())) == 1:
        return lines + [f"Every MoE layer keeps {width} experts: stock loaders load it as it is "
                        "(`AutoModelForCausalLM.from_pretrained(path)`, `vllm serve path`, `allocopt.load_pruned(path)`).", ""]
    return lines + [
        "Layers keep different numbers of experts (`config.layer_num_experts`), which stock model classes cannot build; "
        "plain `from_pretrained(path)` fails with a size mismatch. Load it with:", "",
        "* `allocopt.load_pruned(path)` (allocopt installed);",
        "* `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`: the modelling code is in "
        "`modeling_allocopt.py` beside the weights and needs only torch and transformers (also lm-eval's `hf` model "
        "with `trust_remote_code=True`);",
        f"* vLLM with allocopt installed in the same environment (`vllm serve path`, `vllm.LLM(model=path)`): allocopt's "
        f"`vllm.general_plugins` entry point builds each layer with its own count (tested with vLLM {','.join(TESTED_VLLM)}).", ""]
