"""The single source of default values. Library, CLI, problem files and docs all read from here."""
from __future__ import annotations

SEED = 42

# Default model and data: the embedded testbed (see allocopt.testbed).
MODEL = "testbed"
CALIBRATION_DATA = "testbed:mix"
SEARCH_DATA = "testbed:mix"
# The shipped testbeds (--model NAME) -> their own corpus CORPUS: a run, esap or eval on one of them (or on an export
# pruned from one) defaults to its data CORPUS:mix and its held-out tasks (--tasks-from CORPUS); other models get the
# defaults above.
SHIPPED_CORPORA = {"testbed": "testbed", "testbed-deep": "deep"}

# Calibration (observer) set size.
CALIBRATION_SEQS = 64
CALIBRATION_SEQ_LEN = 256

# Search (ESAP) set size.
SEARCH_SEQS = 16
SEARCH_SEQ_LEN = 256

# Objective.
OBJECTIVE = "esap"
ESAP_TOLERANCE = 1e-4          # certified bound width of the sparse teacher cache
MAX_ESAP_TOLERANCE = 0.1       # wider bounds cannot tell plans apart (ESAP differences between plans are smaller)

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
# Every layer keeps a multiple of this many experts (1: any count); e.g. the expert-parallel size of the server.
COUNT_MULTIPLE = 1

# Where the model runs ("auto": CUDA when present, else CPU) and how many rows go through it at once. A device map
# ("auto": accelerate spreads layers over GPUs, CPU and disk within --max-memory) is off unless asked for.
DEVICE = "auto"
DEVICE_MAP = None
# transformers fused-experts kernel per device type (None: transformers' own default). On CPU the eager per-expert
# loop is ~7x faster than grouped_mm for the testbed (benchmarks/experts_kernel.py); results are identical.
EXPERTS_IMPLEMENTATION: dict[str, str | None] = {"cpu": "eager", "cuda": None}
CALIBRATION_BATCH_SIZE = 8
# Largest safetensors shard `allocopt prune` writes when it streams a model that does not fit in memory (bytes).
EXPORT_SHARD_BYTES = 5 * 10**9

# Observer: real tokens per batch on which every expert runs once to estimate the E x E expert-output similarity.
SIMILARITY_TOKENS = 256
# Layer-streamed calibration of an offloaded model reads a layer's experts this many bytes at a time.
STREAM_SLICE_BYTES = 64 * 2**20

# ESAP engine: bytes of cached decoder hidden states kept for prefix reuse, and rows per forward (None = all rows).
# The rows per forward are also the step of multi-fidelity scoring (racing scores whole micro-batches): 4 rows of
# 256 tokens cost the testbed the same per token as all 16 in one forward on a CPU (benchmarks/esap_throughput.py).
PREFIX_CACHE_BYTES = 1 << 30
ESAP_BATCH_SIZE = 4

# Quantized experts (--bits): input columns that share one scale (compressed-tensors group strategy; W4A16 kernels
# are built for 128). A model whose expert widths it does not divide uses the largest power of two that does.
QUANT_GROUP_SIZE = 128

# Default `ga` search (tuned in benchmarks/search_efficiency.py: a small elitist population with big steps is a
# fast local search around uniform). Mutation step defaults to max(MUTATION_MAX_DELTA, mean experts / 8).
GA_OFFSPRING = 8
GA_ELITES = 4
GA_CROSSOVER_PROB = 0.9
# Racing (successive halving inside a generation, allocopt.search.racing): on by default for ga; offspring per
# generation when racing; the fraction promoted after the first stage and after later ones; an entrant more than
# RACE_Z paired standard errors below the incumbent on the same rows is dropped (None: off).
GA_RACING = True
GA_RACE_OFFSPRING = 16
RACE_KEEP_FIRST = 0.25
RACE_KEEP_NEXT = 0.5
RACE_Z = None
# Generations without a better best before ga restarts around it with a doubled step; the share of --evals the
# sensitivity DP warm start may spend on its probes (fewer counts are probed per layer when it would spend more).
GA_PATIENCE = 6
GA_RESTART = "step"            # "dp": a restart after a fruitless one also re-linearises the DP around the best
GA_DP_BUDGET_SHARE = 1 / 3
GA_WARM_START = True           # generation 0 also holds the sensitivity DP plan (its probes count toward --evals)

# Sensitivity allocation (`dp`, and `ga`'s warm start; allocopt.search.sensitivity): at most this many counts probed
# per layer in round 1 (those within DP_RADIUS of uniform, then the layer's two bounds), linearisation rounds (1:
# probes around uniform only; later rounds stop once one does not improve) and the trust-region radius (experts).
DP_PROBES = 6
DP_ROUNDS = 4
DP_RADIUS = 2

# Other optimizers' options (`--option key=value`; allocopt/search/optimizers): `nsga2`'s range of budgets as
# fractions of experts removed, `grape`'s entropy guard (a removal may lower the entropy of the kept counts to
# (1 - gamma) of the start), plans per ask/tell batch of `tpe` and `cmaes` (None: CMA-ES's own 4 + floor(3 ln L)
# for L layers). `evoesap` reads ELITES and the MUTATION_* values above.
NSGA2_SPARSITY_RANGE = (0.25, 0.75)
GRAPE_GAMMA = 0.1
TPE_BATCH = 8
CMAES_POPSIZE = None

# lm-evaluation-harness adapter: requests per forward pass (lm-eval's own default of 1 leaves a CPU mostly idle).
LM_EVAL_BATCH_SIZE = 16

# vLLM (allocopt.serving): fraction of GPU memory vLLM reserves; on its CPU build, the fraction of host RAM.
VLLM_MEMORY_FRACTION = 0.15

# Worker liveness (allocopt.search.workers, Optuna's RDB heartbeat; whole seconds): a process records a heartbeat for
# each trial it evaluates every HEARTBEAT_INTERVAL_S; the coordinator fails a RUNNING trial without one for
# HEARTBEAT_GRACE_S (its worker died, on any host) and queues its plan again.
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60

# Model identity (allocopt.models.identity): per-tensor sha256 digests of a checkpoint's safetensors files, read once
# per machine in chunks of DIGEST_CHUNK_BYTES (up to DIGEST_THREADS files at a time) and cached under the cache dir
# ($ALLOCOPT_CACHE_DIR, else $XDG_CACHE_HOME/allocopt, else ~/.cache/allocopt) in DIGEST_CACHE_SUBDIR, one JSON per
# checkpoint directory; an entry is reused while its file's (size, mtime_ns, ctime_ns, inode) are unchanged.
CACHE_DIR_ENV = "ALLOCOPT_CACHE_DIR"
DIGEST_CACHE_SUBDIR = "digests"
DIGEST_CACHE_FORMAT = "allocopt.digests/1"
DIGEST_CHUNK_BYTES = 16 << 20
DIGEST_THREADS = 4
DIGEST_CACHE_MAX_FILES = 128   # checkpoints remembered; the least recently used are forgotten (read again if needed)

# ---- processes sharing a search (allocopt.search.workers) -------------------------------------------------------
HOST_ENV = "ALLOCOPT_HOST"       # environment variable: this machine's name in worker ids and locks (default: hostname)
WORKER_START_S = 300.0           # how long `run --workers N` waits for its workers to load before evaluating alone
WORKER_POLL_S = 0.05             # how often an idle worker or the coordinator looks at the queue
WORKERS = 1                      # evaluating processes of a run, the coordinator included

# ---- torch threads (allocopt.runtime.threads) -----------------------------------------------------------------------
THREADS_ENV = "ALLOCOPT_THREADS"  # "auto" (default): the cores other processes leave free; N: exactly N threads
THREADS_SAMPLE_S = 0.25           # how long the machine is watched before the first choice
THREADS_RECHECK_S = 2.0           # the least time between two choices while a search runs
