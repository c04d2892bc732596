"""The plan contract (allocopt.plan/1) as people write it by hand: no model_fingerprint is accepted after the model
checks with one warning line; every other missing or ill-typed field is named."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from allocopt.cli.main import cli
from allocopt.errors import AllocoptError
from allocopt.plan import Plan
from reliability_kit import make_root

LAYERS = [{"index": 0, "num_experts": 8, "kept": [0, 1, 2, 3]}, {"index": 1, "num_experts": 8, "kept": [7, 5, 6, 4]},
          {"index": 2, "num_experts": 8, "kept": [0, 2, 4, 6, 1, 3]}]


@pytest.mark.parametrize("change, message", [
    (lambda p: p["layers"][1].pop("kept"), 'P: layer 1 has no "kept"; give every layer "index", "num_experts" and "kept"'),
    (lambda p: p["layers"][2].pop("num_experts"), 'P: layer 2 has no "num_experts"'),
    (lambda p: p["layers"][0].pop("index"), 'P: layers[0] has no "index"'),
    (lambda p: p["layers"][0].update(index="0"), 'P: layers[0] "index" is a string "0", not an integer'),
    (lambda p: p["layers"][1].update(num_experts=8.5), 'P: layer 1 "num_experts" is a number 8.5, not an integer'),
    (lambda p: p["layers"][1].update(num_experts=True), 'P: layer 1 "num_experts" is a boolean true, not an integer'),
    (lambda p: p["layers"][1].update(kept="0,1"), 'P: layer 1 "kept" is a string, not an array'),
    (lambda p: p["layers"][2].update(kept=[0, "1"]), 'P: layer 2 "kept" holds a string "1", not an expert id'),
    (lambda p: p["layers"].__setitem__(1, [1, 8, [0]]), 'P: layers[1] is an array, not an object'),
    (lambda p: p.update(layers={"0": [1]}), 'P: "layers" is an object, not an array'),
    (lambda p: p.pop("layers"), 'P has no "layers"'),
    (lambda p: p.update(model_fingerprint=12), 'P: "model_fingerprint" is a number, not a string'),
])
def test_every_missing_or_ill_typed_field_is_named(change, message):
    obj = {"format": "allocopt.plan/1", "layers": json.loads(json.dumps(LAYERS))}
    change(obj)
    with pytest.raises(AllocoptError) as err:
        Plan.from_json(obj, source="P")
    assert str(err.value).startswith(message) and "; " in str(err.value), str(err.value)


def test_plan_without_fingerprint_round_trips_without_inventing_one(tmp_path):
    plan = Plan.from_json({"format": "allocopt.plan/1", "layers": LAYERS, "note": "by hand"})
    assert plan.model_fingerprint is None and plan.kept[1] == (4, 5, 6, 7) and plan.extra == {"note": "by hand"}
    back = json.loads(plan.save(tmp_path / "p.json").read_text())
    assert "model_fingerprint" not in back and back["format"] == "allocopt.plan/1" and back["layers"][1]["kept"] == [4, 5, 6, 7]


def test_validation_checks_layers_then_adopts_the_model_fingerprint(caplog):
    num_experts, top_k = {0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}
    with pytest.raises(AllocoptError, match=r"covers MoE layers \[0, 1\] but the model has MoE layers \[0, 1, 2\]"):
        Plan.from_json({"format": "allocopt.plan/1", "layers": LAYERS[:2]}).validate(num_experts, top_k, "f" * 64)
    with pytest.raises(AllocoptError, match="layer 2 says 8 experts, the model has 16"):
        Plan.from_json({"format": "allocopt.plan/1", "layers": LAYERS}).validate({**num_experts, 2: 16}, top_k, "f" * 64)
    with pytest.raises(AllocoptError, match="layer 0 keeps 4 experts, fewer than its top-k 6"):
        Plan.from_json({"format": "allocopt.plan/1", "layers": LAYERS}).validate(num_experts, {**top_k, 0: 6}, "f" * 64)
    assert not caplog.records                                       # a refused plan gets its error, no warning
    plan = Plan.from_json({"format": "allocopt.plan/1", "layers": LAYERS})
    with caplog.at_level("WARNING", logger="allocopt"):
        plan.validate(num_experts, top_k, "f" * 64, source="P").validate(num_experts, top_k, "f" * 64, source="P")
    assert [r.getMessage() for r in caplog.records] == [         # once: afterwards the plan is pinned to the model
        "P has no model_fingerprint, so only its MoE layers, expert counts and top-k were checked against this model; "
        f'add "model_fingerprint": "{"f" * 64}" to pin it to this model']
    assert plan.model_fingerprint == "f" * 64
    with pytest.raises(AllocoptError, match="made for another model"):
        plan.validate(num_experts, top_k, "e" * 64)


def test_prune_and_esap_accept_a_hand_written_plan_with_one_warning_line(tmp_path):
    """Through the real CLI: the same kept experts, with and without model_fingerprint, give the same ESAP; the
    hand-written one prints one warning line, and the exported checkpoint's plan.json is pinned to the model."""
    root = make_root(tmp_path)
    (root / "hand.json").write_text(json.dumps({"format": "allocopt.plan/1", "layers": LAYERS}))
    runner = CliRunner()
    pruned = runner.invoke(cli, ["prune", "--plan", str(root / "hand.json"), "--model", str(root / "model"),
                                 "--out", str(root / "pruned"), "--quiet"])
    assert pruned.exit_code == 0, pruned.output
    warning = (f"warning: plan file {root / 'hand.json'} has no model_fingerprint, so only its MoE layers, expert counts "
               "and top-k were checked against this model; add \"model_fingerprint\": \"")
    assert len(pruned.stderr.splitlines()) == 1 and pruned.stderr.startswith(warning), pruned.stderr
    fingerprint = pruned.stderr.split('"model_fingerprint": "')[1][:64]
    exported = json.loads((root / "pruned" / "plan.json").read_text())
    assert exported["model_fingerprint"] == fingerprint and [l["kept"] for l in exported["layers"]] == [
        sorted(l["kept"]) for l in LAYERS]

    (root / "pinned.json").write_text(json.dumps({"format": "allocopt.plan/1", "model_fingerprint": fingerprint, "layers": LAYERS}))
    values = {}
    for name in ("hand", "pinned"):
        result = runner.invoke(cli, ["esap", "--model", str(root / "model"), "--plan", str(root / f"{name}.json"),
                                     "--data", str(root / "data.txt"), "--seq-len", "24", "--num-seqs", "4", "--json"])
        assert result.exit_code == 0, result.output
        values[name] = json.loads(result.stdout.strip().splitlines()[-1])["esap"]
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
        assert len(warnings) == (name == "hand"), result.stderr
    assert values["hand"] == values["pinned"] < 1.0
