"""One typed configuration for `allocopt run`: defaults < problem file (TOML) < command-line options.

Every key of a problem file is a :class:`RunConfig` field (or one of the shorthands in ``ALIASES``); the file
is parsed as data with ``tomllib`` and never executed. Unknown keys, wrong types and unknown criterion /
optimizer / objective names are refused with one line that lists what is accepted.

    cfg = RunConfig.from_sources("problems/testbed-50.toml", {"optimizer": "tpe", "evals": 100})
    cfg.run_name, cfg.run_dir, cfg.storage_url
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

from allocopt import defaults as D
from allocopt.errors import AllocoptError
from allocopt.objectives.tolerance import check_tolerance
from allocopt.plan import PLAN_FILE, check_allowed_counts, check_bits, require_compressed_tensors
from allocopt.search.space import Budget, check_density


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str = D.MODEL                            # local checkpoint dir or "testbed"
    trust_remote_code: bool = False
    dtype: str | None = None                         # None: the checkpoint's own dtype
    device: str = D.DEVICE                           # "auto": CUDA when present, else CPU
    device_map: str | None = D.DEVICE_MAP            # "auto": accelerate places layers over GPUs, CPU and disk
    max_memory: dict = field(default_factory=dict)  # {"cuda:0" = "70GiB", "cpu" = "200GiB"}; implies device_map
    offload_dir: str | None = None                   # where weights beyond max_memory go
    # what is searched
    criterion: str = D.CRITERION                     # within-layer ranking, e.g. "reap" or "unified:b=1,alpha=0,beta=2"
    optimizer: str = D.OPTIMIZER
    objective: str = D.OBJECTIVE
    tolerance: float = D.ESAP_TOLERANCE
    sparsity: float | None = D.SPARSITY              # fraction of routed experts removed (exclusive with keep)
    keep: int | None = None                          # total routed experts kept (exclusive with sparsity)
    memory: str | int | None = None                  # the export's tensor bytes at most, e.g. "12GiB" (see parse_size)
    memory_ratio: float | None = None                # the same as a fraction of the unpruned export's bytes
    min_density: float = D.MIN_DENSITY
    max_density: float = D.MAX_DENSITY
    count_multiple: int = D.COUNT_MULTIPLE           # every layer keeps a multiple of this (expert parallelism, kernels)
    allowed_counts: list[int] | None = None          # the only counts a layer may keep (what a serving kernel accepts)
    bits: list[int] | None = None                    # bit-widths routed experts may take besides the checkpoint's own
                                                     # (int weight-only, e.g. [8, 4]): searched with the counts; needs
                                                     # memory or memory_ratio
    # data
    calib_data: str = D.CALIBRATION_DATA
    calib_seq_len: int = D.CALIBRATION_SEQ_LEN
    calib_num_seqs: int = D.CALIBRATION_SEQS
    calib_batch_size: int = D.CALIBRATION_BATCH_SIZE
    search_data: str = D.SEARCH_DATA
    search_seq_len: int = D.SEARCH_SEQ_LEN
    search_num_seqs: int = D.SEARCH_SEQS
    allow_long_context: bool = False                 # rows longer than the model's context (max_position_embeddings)
    # budget of the search
    evals: int = D.EVALUATIONS                       # budget in full-fidelity evaluation equivalents (racing: r/R)
    generations: int | None = None                   # shorthand: evals = generations * population
    population: int = D.POPULATION
    seed: int = D.SEED
    options: dict = field(default_factory=dict)     # optimizer-specific, e.g. {elites = 4, mutation_max_delta = 4}
    # where results go
    storage: str | None = None                       # Optuna storage URL; None: sqlite:///<studies dir>/<run name>.db
    out: str | None = None                           # run directory; None: studies/<run name>/
    run_name: str | None = None                      # None: derived from the options (see default_run_name)
    workers: int = D.WORKERS                         # evaluating processes (this one included); see search/workers.py

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, problem: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                     recorded: tuple[str, Mapping[str, Any]] | None = None) -> "RunConfig":
        """Merge defaults, the problem file, ``recorded`` (a source's words and the values it recorded, e.g. a plan
        file's scoring settings) and ``overrides`` (the command line), later over earlier (None values mean "not
        given"), then validate; an error about a value names the source that gave it."""
        layers: list[tuple[str, Mapping[str, Any]]] = []
        if problem is not None:
            layers.append((f"problem file {problem}", read_problem(problem)))
        if recorded is not None:
            layers.append((recorded[0], {k: v for k, v in recorded[1].items() if v is not None}))
        if overrides:
            layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for source, raw in layers:
            layer = _expand(raw, source)
            options = {**values.get("options", {}), **layer.pop("options", {})}   # merged key by key
            values.update(layer, options=options)
            sources.update(dict.fromkeys(layer, source))
        model = values.get("model", D.MODEL)
        values.setdefault("calib_data", default_data(model, D.CALIBRATION_DATA))
        values.setdefault("search_data", default_data(model, D.SEARCH_DATA))
        config = cls(**values)
        object.__setattr__(config, "_sources", sources)       # not a field: a problem file cannot set it
        return config.validate()

    def source_of(self, key: str) -> str | None:
        """Which source set field ``key``: "command line", "problem file P", a recorded source's words; None where
        the default (or a config built without :meth:`from_sources`) gave it."""
        return getattr(self, "_sources", {}).get(key)

    def _named(self, key: str, flag: str | None = None) -> str:
        """How an error names field ``key``: ``flag`` when given, else its flag and key for a field in ``FLAGS``
        (``--seq-len (calib_seq_len)``), else the key, when the command line or nothing gave it; the source and the
        key where a file gave it (``problem file p.toml: tolerance``)."""
        source = self.source_of(key) or "command line"
        if source != "command line":
            return f"{source}: {key}"
        return flag if flag is not None else f"{FLAGS[key]} ({key})" if key in FLAGS else key

    # ---- derived --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.run_name or self.default_run_name()

    def default_run_name(self) -> str:
        """Readable and stable, e.g. ``testbed-reap-ga-s50-seed42``: the same options resume the same study."""
        model = self.model if self.model == "testbed" else Path(self.model).name or "model"
        budget = (f"k{self.keep}" if self.keep is not None else f"m{self.memory}" if self.memory is not None
                  else f"r{self.memory_ratio * 100:g}" if self.memory_ratio is not None else f"s{self.sparsity * 100:g}")
        parts = [model.lower(), _slug(self.criterion), self.optimizer]
        if self.objective != D.OBJECTIVE:
            parts.append(self.objective)
        if self.bits:
            parts.append("b" + ".".join(str(b) for b in sorted(set(self.bits), reverse=True)))
        return "-".join([*parts, budget, f"seed{self.seed}"])

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path(D.STUDIES_DIR) / self.name

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.run_dir.parent / f'{self.name}.db').resolve()}"

    def check_context(self, source=None) -> None:
        """The longer of the two sequence lengths must fit the model's context (read from its config only; a
        ``ModelSource`` whose config was read already is not read again)."""
        from allocopt.runtime.context import check_context

        both = self.calib_seq_len == self.search_seq_len
        length, what = max((self.calib_seq_len, "calib_seq_len"), (self.search_seq_len, "search_seq_len"))
        check_context(self.model if source is None else source, length, "--seq-len" if both else what, self.allow_long_context, self.trust_remote_code,
                      force="--allow-long-context (allow_long_context = true in a problem file)")

    def load_options(self):
        """How the model loads (``allocopt.runtime.LoadOptions``), the same object every command builds."""
        from allocopt.runtime.loading import LoadOptions

        return LoadOptions(device=self.device, dtype=self.dtype, device_map=self.device_map,
                           max_memory=dict(self.max_memory), offload_dir=self.offload_dir,
                           trust_remote_code=self.trust_remote_code)

    def criterion_function(self):
        """The criterion of ``criterion``, parsed once: :meth:`validate` parses it; a config built without
        ``validate`` (a worker's, from its study) parses it on first use."""
        fn = self.__dict__.get("_criterion_fn")
        if fn is None:
            from allocopt.criteria import get_criterion

            fn = get_criterion(self.criterion)
            object.__setattr__(self, "_criterion_fn", fn)
        return fn

    @property
    def max_evals(self) -> int:
        return self.generations * self.population if self.generations is not None else self.evals

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def memory_bytes(self) -> int | None:
        """``memory`` in bytes (:func:`parse_size`: "12GiB", "800MB", or a number of bytes); None when not set."""
        return None if self.memory is None else parse_size(self.memory)

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Range checks and registry look-ups; every failure names the option and the accepted values."""
        if self.memory is None and self.memory_ratio is None:
            Budget(self.sparsity, self.keep)              # the one check of sparsity/keep (search/space.py)
        else:
            given = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
            if len(given) > 1:
                raise AllocoptError(f"both {given[0]} and {given[1]} are set; give only one budget (sparsity, keep, "
                                    "memory or memory_ratio)")
            if self.memory is not None:
                self.memory_bytes()
            elif not 0.0 < self.memory_ratio < 1.0:
                raise AllocoptError(f"memory_ratio must lie strictly between 0 and 1, got {self.memory_ratio:g}; e.g. "
                                    "0.5 keeps an export half the size of the unpruned one")
        check_density(self.min_density, self.max_density)
        for key, low in (("calib_seq_len", 2), ("search_seq_len", 2), ("calib_num_seqs", 1), ("search_num_seqs", 1),
                         ("calib_batch_size", 1), ("evals", 1), ("population", 2), ("generations", 1),
                         ("workers", 1), ("count_multiple", 1)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise AllocoptError(f"{self._named(key)} must be >= {low}, got {value}; raise it")
        if self.allowed_counts is not None:
            check_allowed_counts(self.allowed_counts)
        if self.bits is not None:
            if not check_bits(self.bits):
                raise AllocoptError("--bits lists at least one bit-width, e.g. --bits 8,4; drop --bits for a search of "
                                    "counts only")
            require_compressed_tensors()
            if self.memory is None and self.memory_ratio is None:
                raise AllocoptError("--bits trades experts against bit-widths, which needs a budget in bytes; give --memory "
                                    "SIZE or --memory-ratio R instead of a sparsity or keep count")
            if self.optimizer not in ("ga", "nsga2"):
                raise AllocoptError(f"--bits is searched by ga (the joint count and bit-width search) and nsga2 (its "
                                    f"front); {self.optimizer} searches counts only: drop --optimizer or --bits")
        if self.dtype is not None:
            check_dtype(self.dtype)
        check_tolerance(self.tolerance, self._named("tolerance", "--tolerance"))
        if self.run_name is not None and (not self.run_name or "/" in self.run_name):
            raise AllocoptError(f"run name {self.run_name!r} must be non-empty and contain no '/'; pick a plain name")
        _check_names(self)
        return self


# The command-line flags of fields whose names differ (messages name both).
FLAGS = {"calib_seq_len": "--seq-len", "search_seq_len": "--seq-len", "calib_num_seqs": "--calib-num-seqs",
         "search_num_seqs": "--num-seqs", "calib_batch_size": "--calib-batch-size", "count_multiple": "--count-multiple"}

# The ways to give the budget of a search: exactly one of them is set.
BUDGET_KEYS = ("sparsity", "keep", "memory", "memory_ratio")

# Shorthand keys of a problem file / the CLI that set several fields at once (a specific key wins).
ALIASES: dict[str, tuple[str, ...]] = {
    "data": ("calib_data", "search_data"),
    "seq_len": ("calib_seq_len", "search_seq_len"),
    "name": ("run_name",),
}
FIELDS: dict[str, Any] = typing.get_type_hints(RunConfig)


def shipped_corpus(model: str | Path) -> str | None:
    """The corpus of the shipped testbed ``model`` names (``D.SHIPPED_CORPORA``), or of the one an allocopt export was
    pruned from (its plan.json's ``model``); None for any other model."""
    spec = str(model)
    if spec in D.SHIPPED_CORPORA:
        return D.SHIPPED_CORPORA[spec]
    try:                                                  # an export: plan.json beside its weights names its source
        source = json.loads((Path(spec).expanduser() / PLAN_FILE).read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return D.SHIPPED_CORPORA.get(source) if isinstance(source, str) else None


def default_data(model: str | Path, fallback: str) -> str:
    """Data a run on ``model`` uses unless told: a shipped testbed's own mix (``deep:mix`` for ``testbed-deep`` and
    its exports), else ``fallback`` (``D.CALIBRATION_DATA`` / ``D.SEARCH_DATA``)."""
    corpus = shipped_corpus(model)
    return f"{corpus}:mix" if corpus else fallback


def read_problem(path: str | Path) -> dict[str, Any]:
    """Parse a problem file as TOML data (never executed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise AllocoptError(f"problem file {path} does not exist; pass one of problems/*.toml or your own TOML file") from exc
    except OSError as exc:
        raise AllocoptError(f"cannot read problem file {path} ({exc.strerror}); check the path and permissions") from exc
    except UnicodeDecodeError as exc:
        raise AllocoptError(f"problem file {path} is not UTF-8 text (byte {exc.start}); pass a TOML file") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AllocoptError(f"problem file {path} is not valid TOML ({exc}); fix the syntax") from exc


# Units of a size in bytes (case-insensitive): decimal and binary multiples; a bare K/M/G/T is ambiguous.
SIZE_UNITS = {"": 1, "b": 1, **{f"{p}b": 1000 ** n for n, p in enumerate("kmgt", 1)},
              **{f"{p}ib": 1024 ** n for n, p in enumerate("kmgt", 1)}}
_SIZE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(size: str | int, what: str = "memory") -> int:
    """The one rule for a size in bytes, e.g. ``memory``: a positive number (``5000000``, ``1.5``, ``5e6``) and an
    optional unit, case-insensitive: none or ``B`` bytes, ``KB MB GB TB`` powers of 1000, ``KiB MiB GiB TiB`` powers
    of 1024. A lowercase ``b`` means bytes too (``5gb`` is 5 * 10^9 bytes: nobody means bits for a memory budget); a
    bare ``K M G T`` is refused as ambiguous. Returns whole bytes, rounded down.

        parse_size("12GiB") == 12 * 2**30; parse_size("800mb") == 800_000_000; parse_size(5000000) == 5000000
    """
    if isinstance(size, bool) or not isinstance(size, (str, int)):
        raise AllocoptError(f"{what} {size!r} is not a size; write e.g. 12GiB, 800MB or 5000000 (bytes)")
    text = str(size).strip()
    match = _SIZE.fullmatch(text)
    if match is None:
        raise AllocoptError(f"{what} {text!r} is not a size; write e.g. 12GiB, 800MB or 5000000 (bytes)")
    number, unit = match[1], match[2].lower()
    if unit in ("k", "m", "g", "t"):
        u = match[2].upper()
        raise AllocoptError(f"{what} {text!r} is ambiguous ({u} alone); write {number}{u}B (powers of 1000) or "
                            f"{number}{u}iB (powers of 1024)")
    if unit not in SIZE_UNITS:
        raise AllocoptError(f"{what} {text!r} has unknown unit {match[2]!r}; use B, KB, MB, GB, TB (powers of 1000) or "
                            "KiB, MiB, GiB, TiB (powers of 1024), e.g. 800MB or 12GiB")
    value = Fraction(number)
    if value <= 0:
        raise AllocoptError(f"{what} must be positive, got {text!r}; give a budget such as 12GiB or 800MB")
    out = math.floor(value * SIZE_UNITS[unit])
    if out < 1:
        raise AllocoptError(f"{what} {text!r} is less than one byte; give a budget such as 12GiB or 800MB")
    return out


def check_dtype(name: str) -> str:
    """A torch dtype name such as ``bfloat16`` (what ``--dtype`` accepts), refused in one line otherwise."""
    import torch

    if not isinstance(getattr(torch, name, None), torch.dtype) or not getattr(torch, name).is_floating_point:
        raise AllocoptError(f"dtype {name!r} is not a torch floating-point dtype; use bfloat16, float16 or float32")
    return name


def _expand(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Resolve aliases, reject unknown keys and wrong types; a budget given here (sparsity, keep, memory or
    memory_ratio) clears the others, and so does a search budget (evals or generations; both are refused)."""
    unknown = [k for k in raw if k not in FIELDS and k not in ALIASES]
    if unknown:
        valid = ", ".join(sorted([*FIELDS, *ALIASES]))
        raise AllocoptError(f"{source}: unknown key {unknown[0]!r}; valid keys are {valid}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        for target in ALIASES.get(key, ()):
            _check_type(target, value, source, shown=key)
            out.setdefault(target, value)
    for key, value in raw.items():
        if key in FIELDS:
            _check_type(key, value, source)
            out[key] = value
    given = [k for k in BUDGET_KEYS if k in out]
    if given:                                             # one budget here replaces another source's; two are refused
        out.update({k: None for k in BUDGET_KEYS if k not in given})
    if out.get("evals") is not None and out.get("generations") is not None:
        raise AllocoptError(f"{source} gives both evals ({out['evals']}) and generations ({out['generations']}); give "
                            "one search budget (generations counts generations x population evaluations)")
    if "evals" in out:                                    # evals here replaces another source's generations
        out.setdefault("generations", None)
    return out


def _check_type(key: str, value: Any, source: str, shown: str | None = None) -> None:
    hint = FIELDS[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    allowed = tuple(typing.get_origin(t) or t for t in allowed if t is not type(None))
    ok = any(_is_instance(value, t) for t in allowed)
    if not ok:
        want = " or ".join(t.__name__ for t in allowed)
        raise AllocoptError(f"{source}: {shown or key} must be {want}, got {type(value).__name__} {value!r}; fix its value")


def _is_instance(value: Any, kind: type) -> bool:
    if kind is float:       # TOML writes 1 for 1.0; bool is an int subclass but never a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_names(cfg: RunConfig) -> None:
    """Criterion, optimizer and objective must be registered; the message lists the registered names."""
    from allocopt.objectives import OBJECTIVES
    from allocopt.search.optimizers import available_optimizers

    cfg.criterion_function()                              # parses the spec; refused in one line if unknown
    for what, name, names in (("optimizer", cfg.optimizer, available_optimizers()),
                              ("objective", cfg.objective, list(OBJECTIVES))):
        if name not in names:
            raise AllocoptError(f"unknown {what} {name!r}; choose one of {', '.join(sorted(names))}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
