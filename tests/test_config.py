"""RunConfig: defaults < problem file < command line, and one-line refusals of bad input."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from allocopt import defaults as D
from allocopt.config import ALIASES, FIELDS, RunConfig, parse_size, read_problem
from allocopt.errors import AllocoptError

PROBLEMS = sorted((Path(__file__).resolve().parent.parent / "problems").glob("*.toml"))


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_defaults_come_from_the_defaults_module():
    cfg = RunConfig.from_sources()
    assert cfg == RunConfig()
    assert (cfg.model, cfg.criterion, cfg.optimizer, cfg.objective) == (D.MODEL, D.CRITERION, D.OPTIMIZER, D.OBJECTIVE)
    assert (cfg.sparsity, cfg.keep, cfg.evals, cfg.population, cfg.seed) == (D.SPARSITY, None, D.EVALUATIONS, D.POPULATION, D.SEED)
    assert (cfg.search_num_seqs, cfg.search_seq_len, cfg.calib_num_seqs) == (D.SEARCH_SEQS, D.SEARCH_SEQ_LEN, D.CALIBRATION_SEQS)
    assert cfg.max_evals == D.EVALUATIONS


def test_command_line_overrides_file_overrides_defaults(tmp_path):
    path = _toml(tmp_path, 'optimizer = "random"\nevals = 50\nseed = 7\nmin_density = 0.25\n')
    cfg = RunConfig.from_sources(path, {"evals": 20, "seed": None, "population": 8})
    assert cfg.evals == 20                        # command line beats the file
    assert cfg.optimizer == "random" and cfg.seed == 7 and cfg.min_density == 0.25   # file beats defaults
    assert cfg.population == 8 and cfg.criterion == D.CRITERION                    # untouched -> default


def test_data_shorthand_and_specific_keys(tmp_path):
    path = _toml(tmp_path, 'data = "a.txt"\nsearch_data = "b.txt"\nseq_len = 64\n')
    cfg = RunConfig.from_sources(path)
    assert (cfg.calib_data, cfg.search_data, cfg.calib_seq_len, cfg.search_seq_len) == ("a.txt", "b.txt", 64, 64)
    cfg = RunConfig.from_sources(path, {"data": "c.txt"})       # a later shorthand beats an earlier specific key
    assert (cfg.calib_data, cfg.search_data) == ("c.txt", "c.txt")


def test_keep_on_the_command_line_replaces_the_files_sparsity(tmp_path):
    path = _toml(tmp_path, "sparsity = 0.25\n")
    cfg = RunConfig.from_sources(path, {"keep": 40})
    assert (cfg.keep, cfg.sparsity) == (40, None)
    assert cfg.default_run_name() == "testbed-reap-ga-k40-seed42"
    with pytest.raises(AllocoptError, match="both sparsity and keep"):
        RunConfig.from_sources(_toml(tmp_path, "sparsity = 0.25\nkeep = 3\n"))


def test_options_merge_key_by_key(tmp_path):
    path = _toml(tmp_path, "[options]\nelites = 2\nmutation_max_delta = 3\n")
    cfg = RunConfig.from_sources(path, {"options": {"elites": 6}})
    assert cfg.options == {"elites": 6, "mutation_max_delta": 3}


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    with pytest.raises(AllocoptError) as err:
        RunConfig.from_sources(_toml(tmp_path, "sparsity = 0.5\npopulaton = 8\n"))
    msg = str(err.value)
    assert "'populaton'" in msg and "valid keys are" in msg and "population" in msg and "\n" not in msg


@pytest.mark.parametrize("text, key, want", [
    ('evals = "many"', "evals", "int"),
    ("evals = true", "evals", "int"),
    ("sparsity = [0.5]", "sparsity", "float"),
    ("model = 3", "model", "str"),
    ("trust_remote_code = 1", "trust_remote_code", "bool"),
    ("data = 5", "data", "str"),
])
def test_wrong_types_are_refused(tmp_path, text, key, want):
    with pytest.raises(AllocoptError, match=rf"{key} must be {want}"):
        RunConfig.from_sources(_toml(tmp_path, text + "\n"))


def test_an_integer_is_a_valid_float(tmp_path):
    assert RunConfig.from_sources(_toml(tmp_path, "max_density = 1\n")).max_density == 1.0


@pytest.mark.parametrize("override, words", [
    ({"criterion": "loudness"}, ["unknown criterion 'loudness'", "reap", "frequency"]),
    ({"optimizer": "annealing"}, ["unknown optimizer 'annealing'", "ga", "nsga2", "tpe"]),
    ({"objective": "bleu"}, ["unknown objective 'bleu'", "esap"]),
])
def test_unknown_names_list_the_registered_ones(override, words):
    with pytest.raises(AllocoptError) as err:
        RunConfig.from_sources(None, override)
    assert all(w in str(err.value) for w in words)


@pytest.mark.parametrize("override, word", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": 0.0}, "sparsity"), ({"keep": 0}, "keep"),
    ({"min_density": 0.8, "max_density": 0.5}, "min_density"), ({"population": 1}, "population"),
    ({"evals": 0}, "evals"), ({"run_name": "a/b"}, "run name"),
])
def test_out_of_range_values_are_refused(override, word):
    with pytest.raises(AllocoptError, match=word):
        RunConfig.from_sources(None, override)


@pytest.mark.parametrize("size, want", [
    ("5gb", 5 * 10**9), ("5GB", 5 * 10**9), ("5mb", 5 * 10**6), ("1TB", 10**12), ("1TiB", 2**40), ("12GiB", 12 * 2**30),
    ("5kib", 5120), ("5B", 5), ("5e6", 5 * 10**6), ("1.5 GiB", 3 * 2**29), ("5000000", 5000000), (5000000, 5000000),
    ("2.5b", 2),
])
def test_sizes_are_bytes_with_decimal_and_binary_units(size, want):
    assert parse_size(size) == want


@pytest.mark.parametrize("size, words", [
    ("0", ["memory must be positive, got '0'"]), ("-5GB", ["must be positive"]),
    ("5M", ["'5M' is ambiguous", "5MB", "5MiB"]), ("5k", ["ambiguous", "5KB", "5KiB"]),
    ("5 bits", ["unknown unit 'bits'", "KB, MB, GB, TB", "KiB, MiB, GiB, TiB", "12GiB"]),
    ("lots", ["'lots' is not a size", "12GiB"]),
])
def test_bad_sizes_are_refused_naming_the_fix(size, words):
    with pytest.raises(AllocoptError) as err:
        RunConfig.from_sources(None, {"memory": size})
    msg = str(err.value)
    assert all(w in msg for w in words) and "\n" not in msg


def test_memory_in_a_problem_file_may_be_a_number_of_bytes(tmp_path):
    cfg = RunConfig.from_sources(_toml(tmp_path, 'memory = 5000000\n'))
    assert (cfg.memory_bytes(), cfg.sparsity) == (5000000, None)
    assert RunConfig.from_sources(_toml(tmp_path, 'memory = "5gb"\n')).memory_bytes() == 5 * 10**9


@pytest.mark.parametrize("bits", ["", ",", " , "])
def test_an_empty_bits_list_is_refused(tmp_path, bits):
    from allocopt.plan import check_bits

    want = "--bits lists at least one bit-width, e.g. --bits 8,4; drop --bits for a search of counts only"
    with pytest.raises(AllocoptError) as err:                  # what `allocopt run --bits ,` hands the config
        RunConfig.from_sources(None, {"memory": "5MB", "bits": list(check_bits(bits))})
    assert str(err.value) == want
    with pytest.raises(AllocoptError) as err:
        RunConfig.from_sources(_toml(tmp_path, 'memory = "5MB"\nbits = []\n'))
    assert str(err.value) == want


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(AllocoptError, match="not valid TOML"):
        read_problem(_toml(tmp_path, "sparsity = = 0.5\n"))
    with pytest.raises(AllocoptError, match="does not exist"):
        read_problem(tmp_path / "nope.toml")


def test_derived_names_and_locations(tmp_path):
    cfg = RunConfig.from_sources()
    assert cfg.name == "testbed-reap-ga-s50-seed42"
    assert cfg.run_dir == Path(D.STUDIES_DIR) / cfg.name
    assert cfg.storage_url == f"sqlite:///{(Path(D.STUDIES_DIR) / (cfg.name + '.db')).resolve()}"
    cfg = RunConfig.from_sources(None, {"model": "/m/OLMoE-1B", "criterion": "unified:b=1,alpha=0,beta=2", "sparsity": 0.125,
                                        "out": str(tmp_path / "r"), "generations": 3, "population": 4})
    assert cfg.name == "olmoe-1b-unified-b-1-alpha-0-beta-2-ga-s12.5-seed42"
    assert cfg.storage_url == f"sqlite:///{tmp_path.resolve() / (cfg.name + '.db')}"
    assert cfg.max_evals == 12
    assert RunConfig.from_sources(None, {"run_name": "mine", "storage": "sqlite:///x.db"}).storage_url == "sqlite:///x.db"


def test_every_field_has_a_default_and_every_alias_a_target():
    assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(RunConfig))
    assert all(t in FIELDS for targets in ALIASES.values() for t in targets)


@pytest.mark.parametrize("path", PROBLEMS, ids=[p.name for p in PROBLEMS])
def test_every_problem_file_parses(path):
    cfg = RunConfig.from_sources(path)
    assert cfg.sparsity == int(path.stem.rsplit("-", 1)[1]) / 100    # the file name says the sparsity
    assert cfg.keep is None


def test_the_problem_set_is_complete():
    names = {p.stem for p in PROBLEMS}
    for model in ("testbed", "testbed-deep", "olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b"):
        assert {f"{model}-25", f"{model}-50"} <= names


def test_command_line_option_pairs_are_read_as_toml_values():
    from allocopt.cli.options import parse_key_values

    assert parse_key_values(("elites=2", "rate=0.5", "flag=true", "mode=fast")) == {
        "elites": 2, "rate": 0.5, "flag": True, "mode": "fast"}
    with pytest.raises(AllocoptError, match="KEY=VALUE"):
        parse_key_values(("elites",))


def test_context_length_is_found_for_every_tiny_family_and_for_gpt2_naming():
    import transformers

    from allocopt.runtime.context import context_length
    from allocopt.models.catalog import moe_causal_lm_types
    from allocopt.testing.tiny import tiny_config

    for family in moe_causal_lm_types():          # every family's own name for it (DBRX max_seq_len, ...)
        assert context_length(tiny_config(family))[0] == 128, family
    assert context_length(transformers.GPT2Config(n_positions=64))[0] == 64          # n_positions under its alias
    assert context_length(transformers.T5Config()) is None                           # relative positions: no limit known
