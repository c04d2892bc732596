"""lm-evaluation-harness run offline on two tiny local tasks built from the testbed's MC items (shared by
tests/test_lm_eval.py and tests/test_eval_loading.py; the fixtures are in conftest.py)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import pytest

MC_TASK, LL_TASK = "allocopt_tiny_mc", "allocopt_tiny_ll"
ITEMS = 8

# `target_delimiter: ""` makes lm-eval score exactly allocopt's (context, choice) pairs.
MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""
LL_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
"""


@contextlib.contextmanager
def offline_lm_eval() -> Iterator[None]:
    """lm-eval with the Hugging Face hub and datasets switched to offline mode, as on a machine without network
    (skips where the extra is not installed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        reason = 'lm-eval is an optional extra: pip install "allocopt[lm-eval]"'
        pytest.importorskip("lm_eval", reason=reason)
        pytest.importorskip("lm_eval.models.huggingface", reason=reason)    # needs accelerate (lm-eval[hf])
        import datasets.config
        import huggingface_hub.constants
        for module in (datasets.config, huggingface_hub.constants):          # in case they were imported earlier
            mp.setattr(module, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield


def write_tasks(folder: Path, items: list[dict]) -> Path:
    """``folder`` holding the two tiny tasks (MC_TASK, LL_TASK) on ``items``."""
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    (folder / f"{MC_TASK}.yaml").write_text(MC_YAML.format(name=MC_TASK, data=data), encoding="utf-8")
    (folder / f"{LL_TASK}.yaml").write_text(LL_YAML.format(name=LL_TASK, data=data), encoding="utf-8")
    return folder
