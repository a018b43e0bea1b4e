"""Rank plan JSON: round trips, break-even rule, strict validation, reference loadconfig."""
import json

import pytest

from lems_core.budget import force_factorised, is_force_factorised
from lems_core.model import LayerInfo
from lems_core.plan import (
    MAX_PLAN_BYTES, PLAN_SCHEMA, LayerPlan, LoadconfigWarning, PlanError, RankPlan, from_loadconfig, layer_param_cost, plan_from_ranks,
)
from lems_core.profile import synthetic_profile


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile(num_blocks=3)


def mixed_ranks(profile):
    """Some factorised, some dense, one at break-even (eq_rank -> dense)."""
    ranks = {}
    for i, l in enumerate(profile.layers):
        ranks[l.name] = None if i % 5 == 0 else (l.eq_rank if i % 7 == 0 else max(1, l.eq_rank // 2))
    return ranks


@pytest.fixture
def plan(profile):
    errors = {l.name: 0.01 * i for i, l in enumerate(profile.layers)}
    return plan_from_ranks(profile, mixed_ranks(profile), "lems", predicted_error=errors,
                           error_model={"gamma": 5.0}, meta={"note": "t"}, budget=0.8)


def doc_of(plan):
    return json.loads(plan.to_json())


def test_round_trip_keeps_everything(plan, profile):
    back = RankPlan.from_json(plan.to_json(), layers=profile.layers, fingerprint=profile.fingerprint)
    assert back.ranks() == plan.ranks()
    assert [l.predicted_error for l in back.layers] == [l.predicted_error for l in plan.layers]
    assert (back.model_source, back.fingerprint, back.method, back.decomposition, back.budget) == (
        "synthetic", profile.fingerprint, "lems", profile.decomposition, 0.8)
    assert back.error_model == {"gamma": 5.0} and back.meta == {"calibration": profile.calibration, "note": "t"} and back.created == plan.created
    assert back.summary == plan.summary


def test_json_layout(plan):
    doc = doc_of(plan)
    assert doc["schema"] == PLAN_SCHEMA
    assert set(doc) == {"schema", "model", "method", "decomposition", "budget", "error_model", "layers",
                        "summary", "created", "meta"}
    assert set(doc["model"]) == {"source", "fingerprint"}
    first = doc["layers"][0]
    assert set(first) == {"name", "out", "in", "rank", "param_ratio", "predicted_error"}
    assert first["rank"] == "dense" and first["param_ratio"] == 1.0


def test_break_even_rank_is_stored_dense(profile):
    layer = profile.layers[0]
    assert LayerPlan(layer.name, layer.out_features, layer.in_features, layer.eq_rank).rank is None
    assert LayerPlan(layer.name, layer.out_features, layer.in_features, layer.eq_rank - 1).rank == layer.eq_rank - 1
    assert LayerPlan(layer.name, layer.out_features, layer.in_features, min(layer.out_features, layer.in_features)).rank is None


# ----------------------------------------------------------------- the break-even exception
@pytest.fixture
def forced_plan(profile):
    """Layers 1 and 2 factorised at or above break-even (eq, and min(m, n)), the rest as ``plan``."""
    ranks = mixed_ranks(profile)
    first, second = profile.layers[1], profile.layers[2]
    ranks[first.name] = force_factorised(first.eq_rank)
    ranks[second.name] = force_factorised(min(second.out_features, second.in_features))
    return plan_from_ranks(profile, ranks, "mrcs", budget=0.9)


def test_forced_factorised_layers_round_trip_and_count(forced_plan, profile):
    first, second = profile.layers[1], profile.layers[2]
    doc = doc_of(forced_plan)
    flagged = [l["name"] for l in doc["layers"] if l.get("force_factorised")]
    assert flagged == [first.name, second.name] and doc["layers"][1]["rank"] == first.eq_rank
    assert "force_factorised" not in doc["layers"][0]  # written only where it applies
    back = RankPlan.from_json(forced_plan.to_json(), layers=profile.layers, fingerprint=profile.fingerprint)
    assert back.ranks() == forced_plan.ranks() and back.summary == forced_plan.summary
    assert is_force_factorised(back.ranks()[first.name]) and back.layers[1].force_factorised
    assert back.summary["force_factorised_layers"] == 2
    kept = sum(layer_param_cost(l.out_features, l.in_features, back.ranks()[l.name]) for l in profile.layers)
    assert back.summary["params_kept"] == kept
    assert back.layers[1].params == first.eq_rank * (first.out_features + first.in_features)
    assert back.layers[2].param_ratio > 1.0  # r = min(m, n) costs more than dense, and the plan says so
    assert back.content_hash == forced_plan.content_hash


def test_break_even_rank_without_the_flag_is_still_dense(forced_plan, profile):
    doc = doc_of(forced_plan)
    del doc["layers"][1]["force_factorised"]
    back = RankPlan.from_json(json.dumps(doc))
    assert back.ranks()[profile.layers[1].name] is None and back.summary["force_factorised_layers"] == 1


@pytest.mark.parametrize("rank,flag,match", [
    ("dense", True, "force_factorised needs an integer rank, but the layer is 'dense'"),
    (10_000, True, "rank 10000 out of range"),
    (3, True, "force_factorised is only for ranks at or above the break-even rank"),
    (2.5, True, "rank must be an integer"),
    ("eq", "yes", "force_factorised must be true or false"),
    ("eq", 1, "force_factorised must be true or false"),
])
def test_invalid_force_factorised_is_rejected(forced_plan, profile, rank, flag, match):
    doc = doc_of(forced_plan)
    entry = doc["layers"][1]
    entry["rank"], entry["force_factorised"] = (profile.layers[1].eq_rank if rank == "eq" else rank), flag
    expect_error(json.dumps(doc), f"layer {entry['name']}: {match}")


def test_marked_rank_below_break_even_is_an_ordinary_rank(profile):
    layer = profile.layers[0]
    plan = LayerPlan(layer.name, layer.out_features, layer.in_features, force_factorised(3))
    assert plan.rank == 3 and not plan.force_factorised and not is_force_factorised(plan.rank)


def test_summary_counts_real_parameters(plan, profile):
    ranks = plan.ranks()
    kept = sum(layer_param_cost(l.out_features, l.in_features, ranks[l.name]) for l in profile.layers)
    s = plan.summary
    assert s["params_kept"] == kept and s["params_total"] == profile.total_params
    assert s["realised_ratio"] == pytest.approx(kept / profile.total_params)
    assert s["dense_layers"] == sum(r is None for r in ranks.values()) > 0
    l0 = next(l for l in plan.layers if l.rank is not None)
    assert l0.param_ratio == pytest.approx(l0.rank * (l0.out_features + l0.in_features) / (l0.out_features * l0.in_features))


def test_save_load_atomic(tmp_path, plan, profile):
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left behind
    back = RankPlan.load(path, layers=profile.layers, fingerprint=profile.fingerprint)
    assert back.ranks() == plan.ranks()


def test_loaded_plan_is_in_model_order(plan, profile):
    doc = doc_of(plan)
    doc["layers"].reverse()
    back = RankPlan.from_json(json.dumps(doc), layers=profile.layers)
    assert [l.name for l in back.layers] == [l.name for l in profile.layers]


# ----------------------------------------------------------------- every PlanError case
def expect_error(text, match, **kwargs):
    with pytest.raises(PlanError, match=match):
        RankPlan.from_json(text, **kwargs)


def test_not_json():
    expect_error("{not json", "not valid JSON")
    expect_error(b"\xff\xfe", "not valid JSON")


def test_not_an_object():
    expect_error("[1, 2]", "must be a JSON object, got list")


def test_schema_missing_or_wrong(plan):
    doc = doc_of(plan)
    del doc["schema"]
    expect_error(json.dumps(doc), "no 'schema' field")
    doc["schema"] = "lems-rank-plan/2"
    expect_error(json.dumps(doc), "schema 'lems-rank-plan/2' is not supported")


def test_oversized_is_rejected_before_parsing(tmp_path):
    big = "x" * (MAX_PLAN_BYTES + 1)  # not JSON either: the size check must come first
    expect_error(big, "too large")
    path = tmp_path / "big.json"
    path.write_text(big)
    with pytest.raises(PlanError, match="too large"):
        RankPlan.load(path)


@pytest.mark.parametrize("missing", ["model", "method", "decomposition", "budget", "layers"])
def test_missing_top_level_field(plan, missing):
    doc = doc_of(plan)
    del doc[missing]
    expect_error(json.dumps(doc), f"missing field\\(s\\): {missing}")


@pytest.mark.parametrize("missing", ["name", "out", "in", "rank"])
def test_missing_layer_field(plan, missing):
    doc = doc_of(plan)
    del doc["layers"][2][missing]
    expect_error(json.dumps(doc), f"layer #2 .*missing field\\(s\\): {missing}")


def test_unknown_layers_listed(plan, profile):
    doc = doc_of(plan)
    for i in range(7):
        doc["layers"][i]["name"] = f"model.layers.99.typo_{i}"
    with pytest.raises(PlanError, match="does not have: model.layers.99.typo_0, .*typo_4 ... \\(7 in all\\)") as err:
        RankPlan.from_json(json.dumps(doc), layers=profile.layers)
    assert "typo_5" not in str(err.value)


def test_missing_layers_listed(plan, profile):
    doc = doc_of(plan)
    dropped = doc["layers"].pop(3)["name"]
    expect_error(json.dumps(doc), f"no entry for model layer\\(s\\): {dropped}", layers=profile.layers)
    # without a model table, a partial plan is acceptable
    assert len(RankPlan.from_json(json.dumps(doc)).layers) == len(profile.layers) - 1


@pytest.mark.parametrize("bad", [0, -3, 10_000, 2.5, "12", True, None])
def test_rank_out_of_range(plan, bad):
    doc = doc_of(plan)
    doc["layers"][1]["rank"] = bad
    expect_error(json.dumps(doc), "rank")


def test_rank_messages_are_specific(plan):
    doc = doc_of(plan)
    layer = doc["layers"][1]
    layer["rank"] = 10_000
    expect_error(json.dumps(doc), f"rank 10000 out of range \\[1, {min(layer['out'], layer['in'])}\\]")
    layer["rank"] = "full"
    expect_error(json.dumps(doc), "rank must be an integer or 'dense'")


def test_shape_mismatch(plan, profile):
    doc = doc_of(plan)
    doc["layers"][4]["out"] += 1
    expect_error(json.dumps(doc), "plan shape .* does not match the model's", layers=profile.layers)


def test_wrong_model_names_both_fingerprints_and_source(plan):
    with pytest.raises(PlanError) as err:
        RankPlan.from_json(plan.to_json(), fingerprint="deadbeef00000000")
    msg = str(err.value)
    assert plan.fingerprint in msg and "deadbeef00000000" in msg and "synthetic" in msg


def test_duplicate_layers(plan):
    doc = doc_of(plan)
    doc["layers"].append(dict(doc["layers"][0]))
    expect_error(json.dumps(doc), f"more than once: {doc['layers'][0]['name']}")


@pytest.mark.parametrize("budget", [0, 1.5, "0.8", None])
def test_bad_budget(plan, budget):
    doc = doc_of(plan)
    doc["budget"] = budget
    expect_error(json.dumps(doc), "budget")


def test_plan_from_ranks_checks_coverage(profile):
    ranks = mixed_ranks(profile)
    with pytest.raises(PlanError, match="no entry"):
        plan_from_ranks(profile, {k: v for k, v in list(ranks.items())[1:]}, "x")
    with pytest.raises(PlanError, match="does not have: nope"):
        plan_from_ranks(profile, {**ranks, "nope": 3}, "x")


# ----------------------------------------------------------------- reference loadconfig
def test_loadconfig_round_trip(plan, profile):
    config = plan.to_loadconfig()
    assert config[profile.layers[0].name] == 1.0
    factorised = next(l for l in plan.layers if l.rank is not None)
    assert config[factorised.name] == pytest.approx(factorised.rank / factorised.eq_rank)
    back = from_loadconfig(config, profile.layers, budget=0.8)
    assert back.ranks() == plan.ranks() and back.budget == 0.8


def test_loadconfig_ratio_survives_float_rounding():
    # 1/49*49 == 0.9999999999999999 in IEEE doubles: a naive ratio would read back as rank 0
    layer = LayerInfo("model.layers.0.mlp.up_proj", 0, "up", 98, 98)
    assert layer.eq_rank == 49 and int((1 / 49) * 49) == 0
    plan = RankPlan("s", "f", "m", "d", 0.5, None, [LayerPlan(layer.name, 98, 98, 1)])
    ratio = plan.to_loadconfig()[layer.name]
    assert int(ratio * 49) == 1
    assert from_loadconfig({layer.name: ratio}, [layer]).ranks() == {layer.name: 1}


def test_loadconfig_defaults_and_errors(profile):
    first, second = profile.layers[0], profile.layers[1]
    plan = from_loadconfig({first.name: 0.5}, profile.layers)
    assert plan.ranks()[first.name] == int(0.5 * first.eq_rank)
    assert plan.ranks()[second.name] is None  # unspecified layers stay dense, as in the reference
    assert plan.budget == pytest.approx(plan.summary["realised_ratio"])
    with pytest.raises(PlanError, match="rank 0"):
        from_loadconfig({first.name: 0.5 / first.eq_rank}, profile.layers)
    with pytest.raises(PlanError, match="positive number"):
        from_loadconfig({first.name: -0.1}, profile.layers)
    with pytest.raises(PlanError, match="above 1"):
        from_loadconfig({first.name: 1.5}, profile.layers)
    with pytest.raises(PlanError, match="above 1"):
        from_loadconfig({first.name: 64.0}, profile.layers)  # a rank must be an integer
    with pytest.raises(PlanError, match="out of range"):
        from_loadconfig({first.name: 0}, profile.layers)
    with pytest.raises(PlanError, match="out of range"):
        from_loadconfig({first.name: min(first.out_features, first.in_features) + 1}, profile.layers)
    with pytest.raises(PlanError, match="ratio in"):
        from_loadconfig({first.name: "0.5"}, profile.layers)
    with pytest.raises(PlanError, match="JSON object"):
        from_loadconfig([0.5], profile.layers)


def test_loadconfig_integer_is_an_absolute_rank(profile):
    first, second, third = profile.layers[0], profile.layers[1], profile.layers[2]
    assert 1 < first.eq_rank // 2 < first.eq_rank
    rank = first.eq_rank // 2
    plan = from_loadconfig({first.name: rank, second.name: 1, third.name: third.eq_rank}, profile.layers)
    ranks = plan.ranks()
    assert ranks[first.name] == rank  # not a ratio above 1 (which would be dense or an error)
    assert ranks[second.name] == 1  # integer 1 is rank 1; float 1.0 is dense
    # an integer eq (the reference's MRCS writes its untouched layers so) is factorised, as the reference does
    assert ranks[third.name] == third.eq_rank and is_force_factorised(ranks[third.name])
    assert plan.summary["force_factorised_layers"] == 1
    assert from_loadconfig({second.name: 1.0}, profile.layers).ranks()[second.name] is None
    assert from_loadconfig({third.name: 1.0}, profile.layers).ranks()[third.name] is None


def test_loadconfig_ignores_unknown_keys_with_a_warning(profile):
    first = profile.layers[0]
    with pytest.warns(LoadconfigWarning, match="lm_head"):
        plan = from_loadconfig({first.name: 0.5, "lm_head": 1.0, "bogus": 0.3}, profile.layers)
    assert plan.meta["loadconfig_ignored"] == ["bogus", "lm_head"]
    assert plan.ranks()[first.name] == int(0.5 * first.eq_rank)
    assert set(plan.ranks()) == {l.name for l in profile.layers}


@pytest.mark.parametrize("as_ranks", [False, True])
def test_loadconfig_round_trip_from_the_reference_side(profile, as_ranks):
    """loadconfig -> plan -> loadconfig -> plan keeps every rank (floats, integers and dense mixed)."""
    config = {}
    for i, l in enumerate(profile.layers):
        config[l.name] = [0.37, 0.8, 1.0, max(1, l.eq_rank // 3), l.eq_rank][i % 5]  # integer eq: factorised
    config["lm_head"] = 1.0
    with pytest.warns(LoadconfigWarning):
        plan = from_loadconfig(config, profile.layers)
    exported = plan.to_loadconfig(as_ranks=as_ranks)
    assert "lm_head" not in exported
    assert all((v == 1.0) == (plan.ranks()[k] is None) for k, v in exported.items())
    again = from_loadconfig(json.loads(json.dumps(exported)), profile.layers)
    assert again.ranks() == plan.ranks()
    assert again.to_loadconfig(as_ranks=as_ranks) == exported
    forced = {l.name for l in plan.layers if l.force_factorised}
    assert forced == {l.name for i, l in enumerate(profile.layers) if i % 5 == 4}
    assert all(type(exported[n]) is int for n in forced)  # the reference's integer eq, whatever as_ranks says
    assert forced == {l.name for l in again.layers if l.force_factorised}


def test_loadconfig_export_of_a_forced_layer_is_its_integer_rank(forced_plan, profile):
    first = profile.layers[1]
    config = forced_plan.to_loadconfig()
    assert config[first.name] == first.eq_rank and type(config[first.name]) is int
    assert from_loadconfig(config, profile.layers).ranks() == forced_plan.ranks()


def test_an_uploaded_loadconfig_is_read_for_this_model(plan, profile):
    from lems_core.plan import plan_from_upload

    text = json.dumps(plan.to_loadconfig()).encode()
    back = plan_from_upload(text, profile.layers, profile.fingerprint, "src", decomposition="svd_llm")
    assert back.ranks() == plan.ranks() and back.method == "loadconfig" and back.fingerprint == profile.fingerprint
    assert back.decomposition == "svd_llm" and back.budget == pytest.approx(plan.summary["realised_ratio"])
    same = plan_from_upload(plan.to_json(), profile.layers, profile.fingerprint)  # a plan is still a plan
    assert same.ranks() == plan.ranks() and same.method == "lems"


@pytest.mark.parametrize("doc, match", [
    ({"model.layers.99.mlp.down_proj": 0.5}, "names none of this model"),
    ({}, "no 'schema' field"),
    ({"a": "0.5"}, "no 'schema' field"),
])
def test_an_upload_that_is_neither_plan_nor_loadconfig_is_refused(profile, doc, match):
    from lems_core.plan import plan_from_upload

    with pytest.raises(PlanError, match=match):
        plan_from_upload(json.dumps(doc), profile.layers, profile.fingerprint)
