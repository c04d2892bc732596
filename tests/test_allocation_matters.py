"""benchmarks/allocation_matters.py end to end on the testbed at a tiny budget: real runs, real held-out evaluation."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "allocation_matters.py"


def _script():
    spec = importlib.util.spec_from_file_location("allocation_matters", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    code = _script().main(["--criteria", "frequency", "--sparsities", "0.5", "--seeds", "1", "--evals", "14",
                           "--limit", "4", "--out", str(out)])
    assert code == 0
    return out


def test_writes_table_json_and_density_plot(report):
    data = json.loads((report / "allocation_matters.json").read_text())
    rows = {r["allocation"]: r for r in data["rows"]}
    assert set(rows) == {"uniform", "global", "grape", "dp", "ga"}
    assert all(r["criterion"] == "frequency" and r["sparsity"] == 0.5 for r in rows.values())
    for r in rows.values():
        assert 0.0 < r["esap"] <= 1.0
        assert all(0.0 <= r[k] <= 100.0 for k in ("math_em", "code_em", "mc_acc")) and 0.0 <= r["code_edit_sim"] <= 1.0
        assert all(math.isfinite(r[f"ppl_{d}"]) and r[f"ppl_{d}"] > 1.0 for d in ("code", "prose", "math"))
    # the searched plan never scores below uniform on the search set; deltas are measured against uniform
    assert rows["ga"]["esap"] >= rows["uniform"]["esap"] and rows["dp"]["esap"] >= rows["uniform"]["esap"]
    assert rows["ga"]["d_math_em"] == pytest.approx(rows["ga"]["math_em"] - rows["uniform"]["math_em"])
    for run in data["runs"]:                          # every plan keeps exactly half of the 6 x 16 routed experts
        assert sum(run["counts"]) == 48 and all(4 <= c <= 16 for c in run["counts"])
        assert [len(ids) for ids in run["kept"].values()] == run["counts"]
    assert [g["criterion"] for g in data["goal"]] == ["frequency"]

    table = (report / "allocation_matters.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| frequency | 0.5 |")]
    assert [line.split(" | ")[2] for line in lines] == ["uniform", "global", "grape", "dp", "ga"]
    assert f"{rows['uniform']['esap']:.4f}" in lines[0]
    assert f"{rows['ga']['code_edit_sim']:.3f}" in lines[-1] and "code edit sim" in table
    assert (report / "allocation_matters_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((report / "allocation_matters_density.csv").read_text().splitlines()) == 1 + 5 * 6


def test_rerun_reuses_studies_and_held_out_results(report, capsys):
    before = json.loads((report / "allocation_matters.json").read_text())
    _script().main(["--criteria", "frequency", "--sparsities", "0.5", "--seeds", "1", "--evals", "14",
                    "--limit", "4", "--out", str(report)])
    after = json.loads((report / "allocation_matters.json").read_text())
    assert [r["heldout"] for r in after["runs"]] == [r["heldout"] for r in before["runs"]]
    assert [r["esap"] for r in after["runs"]] == [r["esap"] for r in before["runs"]]
    assert "[5/5] frequency s0.5 ga seed 42" in capsys.readouterr().out


def test_bad_option_is_one_line_error(tmp_path, capsys):
    assert _script().main(["--sparsities", "half", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sparsities") and err.count("\n") == 1


def test_bad_search_seqs_is_one_line_error(tmp_path, capsys):
    assert _script().main(["--search-seqs", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --search-seqs must be >= 1") and err.count("\n") == 1


def test_data_and_search_seqs_reach_every_run(report, tmp_path):
    """--data and --search-seqs reach every run: the math-only grid ranks and scores on 8 rows of math text (the
    studies' search fingerprint is that token set's), so uniform's ESAP differs."""
    import optuna

    from allocopt import defaults as D
    from allocopt.data import load_tokens
    from allocopt.runtime import load_model

    _script().main(["--criteria", "frequency", "--sparsities", "0.5", "--seeds", "1", "--evals", "14",
                    "--limit", "4", "--data", "testbed:math", "--search-seqs", "8", "--out", str(tmp_path)])
    mix = json.loads((report / "allocation_matters.json").read_text())
    math_only = json.loads((tmp_path / "allocation_matters.json").read_text())
    assert math_only["config"]["data"] == "testbed:math" and mix["config"]["data"] == "testbed:mix"
    assert math_only["config"]["search_seqs"] == 8 and mix["config"]["search_seqs"] == D.SEARCH_SEQS
    assert "`testbed:math`, 8 search rows" in (tmp_path / "allocation_matters.md").read_text()
    want = load_tokens("testbed:math", load_model(D.MODEL)[1], D.SEARCH_SEQ_LEN, 8, split="search").fingerprint()
    for run in math_only["runs"]:
        plan = json.loads((Path(run["run_dir"]) / "plan.json").read_text())
        study = optuna.load_study(study_name=plan["run_name"], storage=plan["storage"])
        assert study.user_attrs["search_fingerprint"] == want
    uniform = {d["config"]["data"]: next(r for r in d["runs"] if r["allocation"] == "uniform") for d in (mix, math_only)}
    assert uniform["testbed:math"]["esap"] != pytest.approx(uniform["testbed:mix"]["esap"], abs=1e-3)
    assert uniform["testbed:math"]["kept"] != uniform["testbed:mix"]["kept"]     # Frequency counted on other tokens
