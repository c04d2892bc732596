"""The single source of default values. Library, CLI, problem files and docs all read from here."""
from __future__ import annotations

SEED = 42

# Default model and data: the embedded testbed (see allocopt.testbed).
MODEL = "testbed"
CALIBRATION_DATA = "testbed:mix"
SEARCH_DATA = "testbed:mix"

# Calibration (observer) set size.
CALIBRATION_SEQS = 64
CALIBRATION_SEQ_LEN = 256

# Search (ESAP) set size.
SEARCH_SEQS = 16
SEARCH_SEQ_LEN = 256

# Objective.
OBJECTIVE = "esap"
ESAP_TOLERANCE = 1e-4          # certified bound width of the sparse teacher cache

# Allocation problem.
SPARSITY = 0.5
CRITERION = "reap"
OPTIMIZER = "ga"

# Search budget (EvoESAP paper defaults where they apply: P=32, m=4, dmax=4, tmax=3).
POPULATION = 32
ELITES = 4
MUTATION_MAX_DELTA = 4
MUTATION_MAX_MOVES = 3
MUTATION_ATTEMPTS = 32
EVALUATIONS = 300

# Where runs land.
STUDIES_DIR = "studies"

# Per-layer density bounds of the allocation space (fraction of a layer's experts kept; top-k is always a floor).
MIN_DENSITY = 0.0
MAX_DENSITY = 1.0

# Where the model runs during `allocopt run` and how many rows go through it at once.
DEVICE = "cpu"
# transformers fused-experts kernel per device type (None: transformers' own default). On CPU the eager per-expert
# loop is ~7x faster than grouped_mm for the testbed (benchmarks/experts_kernel.py); results are identical.
EXPERTS_IMPLEMENTATION: dict[str, str | None] = {"cpu": "eager", "cuda": None}
CALIBRATION_BATCH_SIZE = 8

# Observer: real tokens per batch on which every expert runs once to estimate the E x E expert-output similarity.
SIMILARITY_TOKENS = 256

# ESAP engine: bytes of cached decoder hidden states kept for prefix reuse, and rows per forward (None = all rows).
PREFIX_CACHE_BYTES = 1 << 30
ESAP_BATCH_SIZE = None

# Default `ga` search (tuned in benchmarks/search_efficiency.py: a small elitist population with big steps is a
# fast local search around uniform). Mutation step defaults to max(MUTATION_MAX_DELTA, mean experts / 8).
GA_OFFSPRING = 8
GA_ELITES = 4
GA_CROSSOVER_PROB = 0.9

# lm-evaluation-harness adapter: requests per forward pass (lm-eval's own default of 1 leaves a CPU mostly idle).
LM_EVAL_BATCH_SIZE = 16

# vLLM (allocopt.serving): fraction of GPU memory vLLM reserves; on its CPU build, the fraction of host RAM.
VLLM_MEMORY_FRACTION = 0.15
