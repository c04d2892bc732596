"""Optimizer options and the optimizer registry: every registered optimizer refuses unknown keys and bad values in
one line and takes its defaults from allocopt.defaults; a plugin registered through a real entry point (a dist-info
directory on sys.path) is found and runs."""
import dataclasses
import re
import sys
import tomllib
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest

from allocopt import defaults
from allocopt.cli.options import parse_key_values
from allocopt.errors import AllocoptError
from allocopt.search.optimizers import GROUP, Optimizer, SearchContext, _BUILTINS, available_optimizers, get_optimizer, option
from allocopt.search.optimizers.ga import GeneticSearch
from allocopt.search.space import make_space
from allocopt.testing.toy import toy_objective

ROOT = Path(__file__).resolve().parents[1]
NAMES = available_optimizers()
FIELDS = [(name, f.name) for name in NAMES for f in dataclasses.fields(get_optimizer(name).Options)]
DP = {"dp_probes": None, "dp_rows": None, "dp_rounds": defaults.DP_ROUNDS, "dp_radius": defaults.DP_RADIUS}
DEFAULTS = {      # None: derived from the space or the run (documented on each field), from allocopt.defaults values
    "ga": {**DP, "racing": defaults.GA_RACING, "offspring": None, "elites": defaults.GA_ELITES,
           "crossover_prob": defaults.GA_CROSSOVER_PROB, "mutation_max_delta": None,
           "mutation_max_moves": defaults.MUTATION_MAX_MOVES, "warm_start": defaults.GA_WARM_START,
           "patience": defaults.GA_PATIENCE, "race_first_rows": None, "race_z": defaults.RACE_Z,
           "restart": defaults.GA_RESTART},
    "evoesap": {"elites": defaults.ELITES, "mutation_max_moves": defaults.MUTATION_MAX_MOVES,
                "mutation_max_delta": defaults.MUTATION_MAX_DELTA, "mutation_attempts": defaults.MUTATION_ATTEMPTS},
    "cmaes": {"popsize": defaults.CMAES_POPSIZE},
    "tpe": {"batch": defaults.TPE_BATCH},
    "nsga2": {"sparsity_range": defaults.NSGA2_SPARSITY_RANGE, "mutation_max_delta": defaults.MUTATION_MAX_DELTA},
    "dp": DP,
    "random": {}, "uniform": {}, "global": {},
    "grape": {"gamma": defaults.GRAPE_GAMMA},
}


def _field(name: str, key: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(get_optimizer(name).Options)}[key]


BOUNDED = [(name, key, bound) for name, key in FIELDS for bound in ("at_least", "at_most")
           if _field(name, key).metadata.get(bound) is not None]


@pytest.fixture(scope="module")
def space():
    return make_space({l: 8 for l in range(3)}, {l: 2 for l in range(3)}, {l: 10 for l in range(3)}, sparsity=0.5)


def context(space, options, max_evals=12):
    """A SearchContext on the toy objective whose evaluate records every batch it is asked to score."""
    f, seen = toy_objective(space, seed=1), []

    def evaluate(X):
        seen.append(np.array(X, copy=True))
        return f(X)

    rng = np.random.default_rng(0)
    ranking = {l: list(rng.permutation(int(e))) for l, e in zip(space.layers, space.num_experts)}
    scores = {l: rng.random(int(e)) for l, e in zip(space.layers, space.num_experts)}
    sim = {l: rng.random((int(e), int(e))) for l, e in zip(space.layers, space.num_experts)}
    return SearchContext(space, evaluate, 0, max_evals, 6, ranking, scores, SimpleNamespace(similarity=sim),
                         options=dict(options)), seen


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---- every registered optimizer -------------------------------------------------------------------------------

def test_every_builtin_has_its_defaults_from_allocopt_defaults():
    assert set(DEFAULTS) <= set(NAMES)
    for name, expected in DEFAULTS.items():
        opt = get_optimizer(name)
        assert dataclasses.asdict(opt.parse({})) == expected, name
        assert opt.parse(None) == opt.parse({k: None for k in expected}) == opt.Options()


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_is_refused_in_one_line_by_check_and_run(space, name):
    opt = get_optimizer(name)
    keys = [f.name for f in dataclasses.fields(opt.Options)]
    typo = keys[0][:-1] + "x" if keys else "elites"
    with pytest.raises(AllocoptError) as exc:
        opt.check(None, 10**6, {typo: 1})
    message = _one_line(exc)
    assert typo in message and repr(name) in message
    if keys:
        assert f"did you mean {keys[0]}?" in message and all(k in message for k in keys)
    else:
        assert "takes no options" in message
    ctx, seen = context(space, {typo: 1})
    with pytest.raises(AllocoptError, match=re.escape(typo)):
        opt.run(ctx)
    assert seen == []                                  # refused before anything was evaluated


@pytest.mark.parametrize("bad", ["lots", [1, 2, 3]])
@pytest.mark.parametrize("name,key", FIELDS)
def test_a_bad_value_is_refused_with_an_example_that_parses(name, key, bad):
    opt = get_optimizer(name)
    with pytest.raises(AllocoptError) as exc:
        opt.check(None, 10**6, {key: bad})
    message = _one_line(exc)
    assert message.startswith(f"--option {key}={bad!r} ")
    choices = _field(name, key).metadata.get("choices")
    if choices and isinstance(bad, str):
        assert message.endswith(f"must be one of {', '.join(choices)}")
        return
    example = message.split("; e.g. --option ")[1]
    assert example.startswith(f"{key}=")
    opt.parse(parse_key_values((example,)))            # the example, typed as the command line reads it, works


@pytest.mark.parametrize("name,key,bound", BOUNDED)
def test_a_value_out_of_bounds_is_refused(name, key, bound):
    f = _field(name, key)
    limit = f.metadata[bound]
    step = 1 if isinstance(limit, int) else 0.5           # int fields have int bounds
    value = limit - step if bound == "at_least" else limit + step
    value = [value, value] if isinstance(f.default, tuple) else value
    with pytest.raises(AllocoptError) as exc:
        get_optimizer(name).check(None, 10**6, {key: value})
    message = _one_line(exc)
    assert message.startswith(f"--option {key}=")
    assert message.endswith(f"must be >= {limit}; raise it" if bound == "at_least" else f"must be <= {limit}; lower it")
    get_optimizer(name).parse({key: [limit, limit] if isinstance(f.default, tuple) else limit})   # the bound is in


# ---- parsing -------------------------------------------------------------------------------------------------

def test_command_line_text_and_toml_values_parse_to_the_same_typed_options():
    ga = get_optimizer("ga")
    text = ga.parse({"racing": "false", "elites": "6", "crossover_prob": "1", "restart": "dp", "race_z": "1.5",
                     "dp_rows": "8"})
    toml = ga.parse(parse_key_values(("racing=false", "elites=6", "crossover_prob=1", "restart=dp", "race_z=1.5",
                                      "dp_rows=8")))
    assert text == toml
    assert (text.racing, text.elites, text.crossover_prob, text.restart, text.race_z, text.dp_rows) == (
        False, 6, 1.0, "dp", 1.5, 8)
    assert type(text.crossover_prob) is float and type(text.elites) is int
    nsga2 = get_optimizer("nsga2")
    assert nsga2.parse(parse_key_values(("sparsity_range=[0.3,0.6]",))).sparsity_range == (0.3, 0.6)
    assert nsga2.parse({"sparsity_range": "0.3, 0.6"}).sparsity_range == (0.3, 0.6)
    with pytest.raises(AllocoptError, match="is not an int"):
        ga.parse({"elites": 2.5})                     # never truncated
    with pytest.raises(AllocoptError, match="is not an int"):
        ga.parse({"elites": True})                    # true is not a number


def test_racing_is_read_from_the_typed_option():
    ga = get_optimizer("ga")
    assert ga.races({}) is defaults.GA_RACING
    assert ga.races({"racing": "false"}) is False and get_optimizer("dp").races({}) is False
    assert ga.races({"racing": "false", "dp_rows": "4"}) is True                 # the warm start's probes race
    assert ga.races({"racing": "false", "dp_rows": "4", "warm_start": "false"}) is False   # nothing probes on them
    assert ga.races({"racing": "false", "dp_rows": "4", "warm_start": "false", "restart": "dp"}) is True


def test_similarity_is_statistics_not_an_option():
    """grape reads expert similarity from the routing statistics; as an --option it is an unknown key."""
    for name in NAMES:
        with pytest.raises(AllocoptError, match="similarity"):
            get_optimizer(name).check(None, 10**6, {"similarity": {0: np.eye(4)}})


def test_ga_parses_its_options_once_for_all_its_restarts(monkeypatch):
    calls = []
    parse = GeneticSearch.parse
    monkeypatch.setattr(GeneticSearch, "parse", lambda self, options: calls.append(1) or parse(self, options))
    wide = make_space({l: 16 for l in range(6)}, {l: 2 for l in range(6)}, {l: 1 for l in range(6)}, sparsity=0.5)
    ctx, seen = context(wide, {"patience": 1, "warm_start": "false", "elites": 2, "offspring": 2}, max_evals=30)
    get_optimizer("ga").run(ctx)               # patience 1: a restart after every generation without progress
    assert calls == [1] and len(seen) > 5


def test_evoesap_refuses_elites_that_leave_no_offspring(space):
    ctx, seen = context(space, {"elites": 12})
    with pytest.raises(AllocoptError, match="elites=12 of a population of 12"):
        get_optimizer("evoesap").run(ctx)
    assert seen == []


# ---- declarations --------------------------------------------------------------------------------------------

def test_a_misspelt_capability_or_a_mutable_options_class_is_refused_at_definition():
    with pytest.raises(TypeError, match="did you mean fixed_allocation"):
        class Misspelt(Optimizer):
            name = "misspelt"
            fixed_allocaton = True

            def run(self, ctx): ...

    with pytest.raises(TypeError, match="frozen dataclass"):
        class Mutable(Optimizer):
            name = "mutable"

            @dataclasses.dataclass
            class Options:
                steps: int = option(3)

            def run(self, ctx): ...

    with pytest.raises(TypeError, match="no default"):
        class NoDefault(Optimizer):
            name = "no-default"

            @dataclasses.dataclass(frozen=True)
            class Options:
                steps: int

            def run(self, ctx): ...


def test_pyproject_lists_the_builtin_table():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    assert listed == _BUILTINS


# ---- plugins through a real entry point ----------------------------------------------------------------------

PLUGIN = '''
from dataclasses import dataclass

import numpy as np

from allocopt.search.optimizers import Optimizer, option, result_from


class Walk(Optimizer):
    """Uniform and a few random one-expert transfers from it: enough to show a plugin runs."""
    name = "walk"

    @dataclass(frozen=True)
    class Options:
        steps: int = option(4, at_least=1)

    def run(self, ctx):
        opts = self.parse(ctx.options)
        rng, cache, x = np.random.default_rng(ctx.seed), ctx.cache(), ctx.space.uniform()
        cache(x[None])
        for _ in range(opts.steps):
            i, j = rng.choice(ctx.space.size, 2, replace=False)
            y = x.copy()
            y[i], y[j] = y[i] + 1, y[j] - 1
            if ctx.space.contains(y):
                cache(y[None])
        return result_from(cache)


class Plain:
    name = "plain"
'''


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(dist, {name: "module:attr"}, modules={module: source}): a real distribution (a dist-info directory
    that importlib.metadata reads) on sys.path for this test only."""
    imported = []

    def install(dist: str, entries: dict[str, str], modules: dict[str, str] | None = None) -> None:
        root = tmp_path / dist
        info = root / f"{dist.replace('-', '_')}-0.1.dist-info"     # the wheel spelling importlib reads names from
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
        for module, source in (modules or {}).items():
            (root / f"{module}.py").write_text(source)
            imported.append(module)
        monkeypatch.syspath_prepend(str(root))

    yield install
    for module in imported:
        sys.modules.pop(module, None)


def test_a_plugin_registered_through_an_entry_point_is_found_and_runs(space, install):
    install("allocopt-walk", {"walk": "allocopt_walk_plugin:Walk"}, {"allocopt_walk_plugin": PLUGIN})
    assert available_optimizers() == NAMES + ["walk"]
    walk = get_optimizer("walk")
    assert type(walk).__module__ == "allocopt_walk_plugin" and walk.parse({"steps": "2"}).steps == 2
    ctx, seen = context(space, {"steps": 3})
    result = walk.run(ctx)
    assert space.contains(result.best) and result.evaluations == sum(len(b) for b in seen) >= 1
    assert tuple(seen[0][0]) == tuple(space.uniform())
    with pytest.raises(AllocoptError, match="--option step is not an option of optimizer 'walk'; did you mean steps"):
        walk.check(None, 10, {"step": 3})


def test_plugins_that_clash_or_are_not_optimizers_are_refused_in_one_line(install):
    modules = {"allocopt_clash_plugin": PLUGIN}
    install("allocopt-clash", {"walk": "allocopt_clash_plugin:Walk", "ga": "allocopt_clash_plugin:Walk",
                               "plain": "allocopt_clash_plugin:Plain", "walker": "allocopt_clash_plugin:Walk",
                               "broken": "allocopt_no_such_module:Thing"}, modules)
    install("allocopt-clash-too", {"walk": "allocopt_clash_plugin:Walk.Options"})
    names = available_optimizers()
    assert names[:len(NAMES)] == NAMES and names.count("walk") == names.count("ga") == 1
    for name, words in [("walk", "registered twice"), ("ga", "registered twice"), ("plain", "not an Optimizer subclass"),
                        ("walker", "called 'walk'"), ("broken", "failed to load (ModuleNotFoundError")]:
        with pytest.raises(AllocoptError) as exc:
            get_optimizer(name)
        message = _one_line(exc)
        assert words in message and repr(name) in message, message


def test_a_plugin_leaves_with_its_distribution(install, monkeypatch):
    with monkeypatch.context() as m:
        m.syspath_prepend(str(Path(__file__).parent))        # unrelated path change: nothing new
        assert available_optimizers() == NAMES
    install("allocopt-walk", {"walk": "allocopt_walk_plugin:Walk"}, {"allocopt_walk_plugin": PLUGIN})
    assert "walk" in available_optimizers()
    monkeypatch.undo()
    assert available_optimizers() == NAMES


@pytest.mark.parametrize("options, idle", [
    ({"racing": "false", "race_z": "3", "race_first_rows": "8"}, "race_first_rows (racing=false), race_z (racing=false)"),
    ({"warm_start": "false", "dp_probes": "4", "dp_rounds": "2"}, "dp_probes (warm_start=false), dp_rounds (warm_start=false)"),
    ({"warm_start": "false", "restart": "dp", "dp_probes": "4", "dp_rounds": "2"}, "dp_rounds (warm_start=false)"),
    ({"racing": "true", "race_z": "3", "dp_probes": "4"}, None),              # each acts
])
def test_ga_notes_options_another_option_turns_off(options, idle, caplog):
    """``race_z`` with ``racing=false`` or ``dp_rounds`` with ``warm_start=false`` changed nothing, silently; the
    check before loading names them (``restart=dp`` still probes with ``dp_probes``, so that one is not named)."""
    with caplog.at_level("INFO", logger="allocopt"):
        get_optimizer("ga").check(None, 300, options)
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("allocopt")]
    assert notes == ([f"ga: --option {idle} changes nothing in this search"] if idle else [])
