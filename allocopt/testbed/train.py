"""Train a testbed MoE from scratch on its offline corpus (python -m allocopt.testbed.train [--recipe deep]).

Plain on purpose, in the spirit of nanoGPT's train.py: build the tokenizer, build the recipe's model config, then loop
over fixed-composition batches (some rows of every domain, so the loss curve is logged per domain) with AdamW and
a cosine schedule. The router's load-balancing loss keeps every expert in use so experts can specialise.
Everything is seeded, the schedule is defined in steps and training runs on one CPU thread (multi-threaded CPU
reductions change the summation order, and the drift grows into a different model), so the same seed and torch
build reproduce the same weights bit for bit; ``--minutes`` is only a safety cap (a capped run is logged as such).
With ``--work DIR`` the run saves its whole state there every ``--save-every`` steps and a later call with the same
arguments resumes from it, giving the weights an uninterrupted run gives.

A :class:`Recipe` holds what differs between the testbeds (corpus, model config, and its :class:`Phase` list: batch
composition and learning-rate schedule per phase): ``first`` is the default testbed (OLMoE, 6 x 16 experts, one phase),
``deep`` the deep one (``allocopt.testbed.deep``): a pretraining phase, then a math-heavy annealing phase with a fresh
warm-up and cosine at a lower peak, in the manner of OLMo 2's mid-training (Team OLMo, "2 OLMo 2 Furious", 2024),
then expert-drop phases: structured dropout at the granularity of experts (each step, each MoE layer routes around
a random number of randomly chosen experts), the expert analogue of LayerDrop (Fan, Grave and Joulin, "Reducing
Transformer Depth on Demand with Structured Dropout", ICLR 2020). It stands in for the redundancy that makes models
of billions of parameters degrade gracefully when experts are removed, which a 12 M-parameter model trained on three
narrow tasks lacks; drawn uniformly, not by any criterion, so no criterion is favoured.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import math
import random
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import OlmoeConfig, OlmoeForCausalLM, PretrainedConfig, Qwen2MoeConfig, Qwen2MoeForCausalLM

from allocopt.io import atomic_write_json
from allocopt.models.adapter import find_moe_blocks
from allocopt.models.masking import mask_experts
from allocopt.testbed import corpus, path
from allocopt.testbed.tokenizer import VOCAB_SIZE, save_tokenizer, tokenizer_from_json, train_tokenizer

SEQ_LEN = 256
ROWS = {"math": 6, "code": 2, "prose": 1}    # rows of each domain in every batch; math weighted for its EM goal
STEPS = 3500     # math EM: 86% or 44% for two 2000-step runs; 82% and 89% for seeds 42/43 at 3500
WARMUP = 150
LR, MIN_LR, WEIGHT_DECAY, GRAD_CLIP = 2e-3, 2e-4, 0.1, 1.0
LOG_EVERY = 25
TRAIN_THREADS = 1   # bit-reproducible; 2 threads is 1.5x faster but two runs of one seed diverge after ~50 steps


def model_config(vocab_size: int, eos_id: int, pad_id: int) -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        num_experts=16, num_experts_per_tok=4, router_aux_loss_coef=0.01, output_router_logits=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False,
    )


def deep_model_config(vocab_size: int, eos_id: int, pad_id: int) -> Qwen2MoeConfig:
    """12 MoE layers of 64 routed experts of width 32 (hidden/4), top-8, one shared expert of width 128 with its
    sigmoid gate: Qwen2-MoE's classes, which transformers and vLLM both have."""
    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=12,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=32, shared_expert_intermediate_size=128,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.01,
        output_router_logits=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        tie_word_embeddings=False,
    )


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of training with one batch composition (rows of each domain per batch) and one schedule: linear
    warm-up to ``lr`` over ``warmup`` steps, then cosine down to ``min_lr`` at the phase's last step. With
    ``expert_drop`` > 0, each step removes from each MoE layer's routing a number of experts drawn uniformly from 0 to
    ``expert_drop`` x its experts, chosen uniformly (see the module docstring)."""

    steps: int
    rows: dict[str, int]
    lr: float = LR
    min_lr: float = MIN_LR
    warmup: int = WARMUP
    expert_drop: float = 0.0

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step`` counted from the phase's start."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What one testbed is trained from: its corpus module (``documents(domain, "train")`` and a math generator),
    model config and phases (run one after another, the optimizer state carried across)."""

    name: str
    corpus: Callable[[], ModuleType]
    config: Callable[[int, int, int], PretrainedConfig]
    model_class: Callable[[], type]
    out: Callable[[], Path]
    phases: tuple[Phase, ...]
    vocab_size: int = VOCAB_SIZE
    store_dtype: torch.dtype = torch.float32          # what the shipped checkpoint stores (training runs in float32)

    @property
    def steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def with_steps(self, steps: int) -> "Recipe":
        """The recipe cut or stretched to ``steps`` in all by changing its last phase's length (``--steps``)."""
        head = sum(p.steps for p in self.phases[:-1])
        if steps <= head:
            raise ValueError(f"--steps {steps} leaves nothing of the last phase; the earlier phases take {head} steps")
        return dataclasses.replace(self, phases=self.phases[:-1] + (dataclasses.replace(self.phases[-1], steps=steps - head),))

    def phase_at(self, step: int) -> tuple[Phase, int]:
        """The phase that ``step`` (counted from the run's start) belongs to, and the step within it."""
        for phase in self.phases:
            if step < phase.steps:
                return phase, step
            step -= phase.steps
        raise IndexError(step)


def _deep_corpus() -> ModuleType:
    from allocopt.testbed.deep import corpus as deep_corpus

    return deep_corpus


def _deep_path() -> Path:
    from allocopt.testbed import deep

    return deep.path()


DEEP_PHASES = (
    Phase(3000, {"math": 4, "code": 3, "prose": 2}),
    # annealing: the word problems are what the held-out EM measures and what 3000 steps left undertrained
    Phase(4000, {"math": 6, "code": 2, "prose": 1}, lr=1e-3, min_lr=5e-5, warmup=100),
    # expert drop up to 3/8 of each layer: 25% sparsity inside what training saw, 50% outside it
    Phase(1200, {"math": 6, "code": 2, "prose": 1}, lr=3e-4, min_lr=3e-5, warmup=50, expert_drop=0.375),
    # a second schedule of the same, added once the first had run: it raised every 25% plan's math EM
    Phase(1500, {"math": 6, "code": 2, "prose": 1}, lr=3e-4, min_lr=3e-5, warmup=50, expert_drop=0.375),
)

RECIPES = {
    "first": Recipe("first", lambda: corpus, model_config, lambda: OlmoeForCausalLM, path, (Phase(STEPS, ROWS),)),
    "deep": Recipe("deep", _deep_corpus, deep_model_config, lambda: Qwen2MoeForCausalLM,
                   _deep_path, DEEP_PHASES, vocab_size=4096, store_dtype=torch.bfloat16),
}


class Stream:
    """Random fixed-length windows from one domain's training documents joined by EOS."""

    def __init__(self, ids: list[int], generator: torch.Generator):
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.generator = generator

    def rows(self, n: int) -> torch.Tensor:
        starts = torch.randint(0, len(self.ids) - SEQ_LEN - 1, (n,), generator=self.generator)
        return torch.stack([self.ids[s:s + SEQ_LEN + 1] for s in starts.tolist()])


class MathStream:
    """Fresh training-split worksheets every batch: the problem space is small, so sample it, don't store it."""

    def __init__(self, tokenizer, rng: random.Random, source: ModuleType = corpus):
        self.tokenizer, self.rng, self.source = tokenizer, rng, source

    def rows(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            ids: list[int] = []
            while len(ids) < SEQ_LEN + 1:
                text = self.source.math_worksheet(self.rng, "train").text
                ids += [self.tokenizer.eos_token_id] + self.tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
            out.append(torch.tensor(ids[:SEQ_LEN + 1]))
        return torch.stack(out)


def dropped_routing(layers: dict[int, int], fraction: float, generator: torch.Generator) -> dict[int, list[int]]:
    """Kept experts per MoE layer (``layers``: layer index -> experts) for one expert-drop step: drop k ~ U{0..
    floor(fraction x experts)} experts chosen uniformly; layers that drop none are left out."""
    kept = {}
    for layer, n in sorted(layers.items()):
        k = int(torch.randint(0, int(fraction * n) + 1, (1,), generator=generator))
        if k:
            kept[layer] = sorted(torch.randperm(n, generator=generator)[k:].tolist())
    return kept


def encode_domain(tokenizer, domain: str, source: ModuleType = corpus) -> list[int]:
    ids: list[int] = []
    for doc in source.documents(domain, "train"):
        ids += [tokenizer.eos_token_id] + tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids


def train(out: Path, steps: int, minutes: float, seed: int, recipe: Recipe = RECIPES["first"],
          work: Path | None = None, save_every: int = 250) -> dict:
    """Train ``recipe`` for ``steps`` in all (its own total, or its last phase cut/stretched to that) and save the
    model to ``out`` in the recipe's stored dtype with its tokenizer and ``train_log.json``; returns the log."""
    if steps != recipe.steps:
        recipe = recipe.with_steps(steps)
    torch.set_num_threads(TRAIN_THREADS)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    drop_generator = torch.Generator().manual_seed(seed + 1)     # drawn only in expert-drop phases
    source = recipe.corpus()
    if hasattr(source, "check_train_corpus"):          # a pinned training text: refuse a machine that reads another
        source.check_train_corpus()
    state_file = work / "state.pt" if work is not None else None
    state = torch.load(state_file, weights_only=False) if state_file is not None and state_file.is_file() else None
    if state is not None and "tokenizer" in state:
        tokenizer = tokenizer_from_json(state["tokenizer"])
    else:
        tokenizer = train_tokenizer(recipe.vocab_size, None if source is corpus else _texts(source))
    streams = {"math": MathStream(tokenizer, random.Random(seed), source),
               "code": Stream(encode_domain(tokenizer, "code", source), generator),
               "prose": Stream(encode_domain(tokenizer, "prose", source), generator)}

    config = recipe.config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = recipe.model_class()(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))
    moe_layers = {b.layer: b.info.num_experts for b in find_moe_blocks(model)}
    n_params = sum(p.numel() for p in model.parameters())
    phases = [dataclasses.asdict(p) for p in recipe.phases]
    print(f"params {n_params / 1e6:.2f}M, vocab {len(tokenizer)}, {steps} steps of "
          + " then ".join(f"{p.steps} x {sum(p.rows.values())}x{SEQ_LEN}" for p in recipe.phases))

    log: dict = {"recipe": recipe.name, "seed": seed, "steps": steps, "threads": TRAIN_THREADS,
                 "torch": torch.__version__, "phases": phases, "seq_len": SEQ_LEN, "params": n_params, "curve": []}
    if hasattr(source, "source_versions"):              # a corpus read from installed files: what it read
        log["corpus_sources"] = source.source_versions()
    text_digest = _digest(streams)
    log["train_text_sha256"] = {"0": text_digest}
    first, spent = 0, 0.0
    if state is not None:                                        # resume: every state the next step depends on
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        streams["math"].rng.setstate(state["math_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "drop_generator" in state:          # a state saved before expert drop existed had not drawn from it
            drop_generator.set_state(state["drop_generator"])
        first, spent, log = state["step"], state["spent"], state["log"]
        log.pop("rows", None)                  # a state saved before phases existed: one phase, which it recorded
        log.update(steps=steps, phases=phases)  # a run resumed into later phases (or longer) records what it became
        digests = log.setdefault("train_text_sha256", {})
        if text_digest not in digests.values():  # the machine's files changed under the run: say so and from when
            print(f"warning: this machine's training text differs from the one the run started on "
                  f"(sha256 {text_digest[:12]} vs {', '.join(d[:12] for d in digests.values()) or 'unrecorded'}); "
                  f"resuming on it from step {first}", flush=True)
            digests[str(first)] = text_digest
        if "corpus_sources" in log and hasattr(source, "source_versions"):
            log.setdefault("corpus_sources_by_step", {})[str(first)] = source.source_versions()
        print(f"resumed at step {first} from {state_file}", flush=True)
    t0 = time.time() - spent
    sitting = time.time()                     # --minutes caps this invocation, not the run's earlier sittings
    model.train()
    for step in range(first, steps):
        phase, phase_step = recipe.phase_at(step)
        rows, lr = {d: n for d, n in phase.rows.items() if n}, phase.lr_at(phase_step)
        batch = torch.cat([streams[d].rows(n) for d, n in rows.items()])
        x, y = batch[:, :-1], batch[:, 1:]
        for group in optimizer.param_groups:
            group["lr"] = lr
        kept = dropped_routing(moe_layers, phase.expert_drop, drop_generator) if phase.expert_drop else {}
        with mask_experts(model, kept) if kept else contextlib.nullcontext():
            outputs = model(input_ids=x, output_router_logits=True)
        token_loss = F.cross_entropy(outputs.logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        loss = token_loss.mean() + config.router_aux_loss_coef * outputs.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

        if step % LOG_EVERY == 0 or step == steps - 1:
            row_loss = token_loss.detach().mean(1)
            per_domain, i = {}, 0
            for d, n in rows.items():
                per_domain[d] = round(float(row_loss[i:i + n].mean()), 4)
                i += n
            elapsed = time.time() - t0
            log["curve"].append({"step": step, "lr": lr, "loss": per_domain,
                                 "aux_loss": round(outputs.aux_loss.item(), 4), "elapsed_s": round(elapsed, 1)})
            print(f"step {step:5d} | {per_domain} | aux {outputs.aux_loss.item():.3f} | {elapsed:6.0f}s", flush=True)
        if state_file is not None and ((step + 1) % save_every == 0 or step == steps - 1):
            work.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "math_rng": streams["math"].rng.getstate(),
                        "torch_rng": torch.get_rng_state(), "drop_generator": drop_generator.get_state(),
                        "tokenizer": tokenizer.backend_tokenizer.to_str(),
                        "step": step + 1, "spent": time.time() - t0,
                        "log": log}, work / "state.pt.tmp")
            (work / "state.pt.tmp").replace(state_file)
        if time.time() - sitting > minutes * 60:
            log["capped_at_step"] = step + 1
            print(f"stopped by the --minutes {minutes} cap after {step + 1} steps", flush=True)
            break

    log["train_seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(recipe.store_dtype).save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out)
    atomic_write_json(out / "train_log.json", log)
    return log


def _digest(streams: dict) -> str:
    """sha256 of the code and prose token streams: what the run trains on beside the generated math."""
    h = hashlib.sha256()
    for name in ("code", "prose"):
        h.update(name.encode() + streams[name].ids.numpy().tobytes())
    return h.hexdigest()


def _texts(source: ModuleType) -> Any:
    """Training texts of a corpus module for its tokenizer: code and prose documents and 200 math worksheets."""
    yield from (d.text for d in source.documents("code", "train"))
    yield from (d.text for d in source.documents("prose", "train"))
    rng = random.Random("testbed-tokenizer")
    yield from (source.math_worksheet(rng, "train").text for _ in range(200))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="first")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint directory (default: the recipe's shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock safety cap on this invocation (a resumed run's earlier sittings do not count)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=None, help="save the run's state here and resume from it")
    parser.add_argument("--save-every", type=int, default=250)
    args = parser.parse_args()
    recipe = RECIPES[args.recipe]
    train(args.out or recipe.out(), args.steps or recipe.steps, args.minutes, args.seed, recipe, args.work,
          args.save_every)


if __name__ == "__main__":
    main()
