"""qshard.config: the recipe is parsed once, unknown keys and bad values are QShardErrors naming the option."""

from __future__ import annotations

import pytest
import yaml

from qshard.config import Recipe, dump_recipe, load_recipe, parse_recipe
from qshard.errors import QShardError

MINIMAL = {"model": {"path": "models/m"}, "data": {"path": "train.jsonl"}}


def with_option(dotted: str, value) -> dict:
    section, key = dotted.split(".")
    return {**MINIMAL, section: {**MINIMAL.get(section, {}), key: value}}


def write_recipe(tmp_path, raw: dict | str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


# -- unknown keys --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, unknown, suggestion", [
    ({**MINIMAL, "trian": {"max_steps": 3}}, "trian", "did you mean train?"),
    (with_option("train.max_step", 3), "train.max_step", "did you mean train.max_steps?"),
    (with_option("lora.dropuot", 0.1), "lora.dropuot", "did you mean lora.dropout?"),
    (with_option("model.pth", "m"), "model.pth", "did you mean model.path?"),
    (with_option("distributed.zero_stag", 3), "distributed.zero_stag", "did you mean distributed.zero_stage?"),
])
def test_unknown_key_is_refused_with_the_closest_known_key(raw, unknown, suggestion):
    with pytest.raises(QShardError) as err:
        parse_recipe(raw, source="r.yaml")
    assert err.value.what == f"unknown recipe key {unknown!r}"
    assert err.value.where == f"r.yaml: {unknown}"
    assert err.value.fix == suggestion


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    with pytest.raises(QShardError) as err:
        parse_recipe(with_option("lora.rank", 8))
    assert err.value.fix == "known keys: r, alpha, dropout, target_modules, use_dora, use_rslora"


# -- values out of range -------------------------------------------------------------------------

@pytest.mark.parametrize("dotted, value, complaint", [
    ("lora.r", 0, "greater than or equal to 1"),
    ("data.max_length", 0, "greater than or equal to 1"),
    ("lora.dropout", 1.5, "less than 1"),
    ("distributed.zero_stage", 4, "1, 2 or 3"),
    ("train.learning_rate", 0, "greater than 0"),
    ("train.max_steps", 7.5, "valid integer"),
    ("train.grad_flow_every", -1, "greater than or equal to 0"),
])
def test_out_of_range_value_names_the_dotted_option_and_the_bad_value(dotted, value, complaint):
    with pytest.raises(QShardError) as err:
        parse_recipe(with_option(dotted, value), source="r.yaml")
    assert err.value.where == f"r.yaml: {dotted}"
    problem = err.value.what.splitlines()[1]
    assert problem.startswith(f"  - {dotted}: ")
    assert complaint in problem
    assert problem.endswith(f"(got {value!r})")


def test_every_bad_value_is_listed_not_only_the_first():
    raw = {**MINIMAL, "lora": {"r": 0, "dropout": 2.0}, "train": {"learning_rate": -1}}
    with pytest.raises(QShardError) as err:
        parse_recipe(raw)
    named = [line.split(":")[0].strip(" -") for line in err.value.what.splitlines()[1:]]
    assert named == ["lora.r", "lora.dropout", "train.learning_rate"]


def test_missing_required_sections_are_named():
    with pytest.raises(QShardError) as err:
        parse_recipe({})
    assert [line.split(":")[0].strip(" -") for line in err.value.what.splitlines()[1:]] == ["model", "data"]


def test_offload_params_without_zero3_is_refused():
    raw = {**MINIMAL, "distributed": {"engine": "deepspeed", "zero_stage": 2, "offload_params": "cpu"}}
    with pytest.raises(QShardError) as err:
        parse_recipe(raw)
    assert "offload_params: cpu needs engine: deepspeed with zero_stage: 3" in err.value.what


# -- --set overrides -----------------------------------------------------------------------------

def test_overrides_set_nested_keys_with_yaml_typed_values(tmp_path):
    path = write_recipe(tmp_path, {**MINIMAL, "lora": {"r": 8}})
    recipe = load_recipe(path, ["train.max_steps=7", "lora.target_modules=[q_proj,v_proj]",
                                "train.max_grad_norm=null", "model.gradient_checkpointing=true",
                                "lora.alpha=8.5", "train.sample_prompt=a=b"])
    assert recipe.train.max_steps == 7 and type(recipe.train.max_steps) is int
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.max_grad_norm is None
    assert recipe.model.gradient_checkpointing is True
    assert recipe.lora.alpha == 8.5
    assert recipe.lora.r == 8  # a sibling key from the file survives
    assert recipe.train.sample_prompt == "a=b"  # only the first '=' separates key from value


def test_override_creates_a_section_absent_from_the_file(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL), ["distributed.engine=deepspeed", "distributed.zero_stage=3"])
    assert recipe.distributed.zero_stage == 3


def test_later_override_of_the_same_key_wins(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, MINIMAL), ["train.seed=1", "train.seed=5"])
    assert recipe.train.seed == 5


@pytest.mark.parametrize("item", ["foo", "=3", "lora.r"])
def test_malformed_override_is_refused(tmp_path, item):
    with pytest.raises(QShardError) as err:
        load_recipe(write_recipe(tmp_path, MINIMAL), [item])
    assert err.value.what == f"bad override {item!r}"
    assert err.value.where == "--set"


def test_override_through_a_scalar_is_refused(tmp_path):
    with pytest.raises(QShardError) as err:
        load_recipe(write_recipe(tmp_path, {**MINIMAL, "lora": {"r": 8}}), ["lora.r.x=3"])
    assert err.value.what == "cannot set lora.r.x: r is not a section"


def test_override_of_an_unknown_key_gets_a_suggestion(tmp_path):
    with pytest.raises(QShardError) as err:
        load_recipe(write_recipe(tmp_path, MINIMAL), ["train.learning_rat=1e-3"])
    assert err.value.fix == "did you mean train.learning_rate?"


def test_override_with_unparsable_yaml_value_is_a_qshard_error(tmp_path):
    with pytest.raises(QShardError) as err:
        load_recipe(write_recipe(tmp_path, MINIMAL), ["train.max_steps=[1"])
    assert "train.max_steps=[1" in err.value.where


# -- the recipe file -----------------------------------------------------------------------------

def test_missing_recipe_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(QShardError) as err:
        load_recipe(path)
    assert err.value.what == f"recipe not found: {path}"
    assert err.value.where == str(path)


def test_invalid_yaml_names_the_file_and_the_line(tmp_path):
    path = write_recipe(tmp_path, "model: {path: m}\ndata: {path: d.jsonl\n", name="broken.yaml")
    with pytest.raises(QShardError) as err:
        load_recipe(path)
    assert err.value.what.startswith("recipe is not valid YAML")
    assert "line 2" in err.value.what
    assert err.value.where == str(path)


def test_a_recipe_that_is_a_list_is_refused(tmp_path):
    path = write_recipe(tmp_path, "- model\n- data\n")
    with pytest.raises(QShardError) as err:
        load_recipe(path)
    assert err.value.what == "recipe must be a mapping of sections"
    assert err.value.where == str(path)


def test_errors_from_a_file_name_the_file_and_the_option(tmp_path):
    path = write_recipe(tmp_path, with_option("lora.r", 0))
    with pytest.raises(QShardError) as err:
        load_recipe(path)
    assert err.value.where == f"{path}: lora.r"


# -- dump and the fixed keys ---------------------------------------------------------------------

def test_dump_recipe_round_trips_to_an_equal_recipe(tmp_path):
    raw = {"model": {"path": "models/m", "dtype": "bfloat16"},
           "quantization": {"method": "int8", "skip_modules": ["lm_head", "gate"]},
           "lora": {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
           "data": {"path": "d.jsonl", "max_length": 128, "packing": True, "eval_fraction": 0.25},
           "train": {"output_dir": "runs/x", "max_steps": 9, "learning_rate": 3e-5, "lr_scheduler": "linear",
                     "max_grad_norm": None, "save_every": 3, "keep_checkpoints": 1, "sample_prompt": "yes: no?"},
           "distributed": {"engine": "deepspeed", "zero_stage": 3, "offload_params": "cpu"}}
    recipe = parse_recipe(raw)
    again = parse_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe
    assert again.train.sample_prompt == "yes: no?" and again.distributed.zero_stage == 3
    path = write_recipe(tmp_path, dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_fixed_keys_other_tools_read_exist_with_their_defaults():
    recipe = parse_recipe(MINIMAL)
    dumped = yaml.safe_load(dump_recipe(recipe))
    assert dumped["model"]["path"] == "models/m"
    assert dumped["train"]["max_steps"] is None
    assert dumped["train"]["output_dir"] == "runs/qshard"
    assert dumped["train"]["seed"] == 42
    assert dumped["train"]["save_every"] is None
    assert dumped["train"]["keep_checkpoints"] == 2
    assert dumped["distributed"]["engine"] == "none"
    assert dumped["distributed"]["zero_stage"] == 2
    assert dumped["train"]["grad_flow_every"] == 0  # gradient flow checked at steps 1-2 only
    assert list(dumped) == list(Recipe.model_fields) == ["model", "quantization", "lora", "data", "train",
                                                         "distributed"]


def test_readme_shows_the_compatibility_table_as_it_is():
    from pathlib import Path

    from qshard.compat import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme
