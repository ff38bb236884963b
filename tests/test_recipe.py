"""Recipe loading: shipped recipes validate; bad files fail at load naming the file, key and line."""

from __future__ import annotations

import textwrap

import pytest

from draftsmith.recipe.loader import RECIPES_DIR, RecipeError, load_recipe, settings_hash


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_shipped_recipes_validate(name):
    recipe = load_recipe(name)
    assert recipe.name == name


def test_tiny_recipe_is_the_embedded_default():
    recipe = load_recipe("tiny-eagle3")
    assert recipe.base.model == "embedded"
    assert recipe.draft.algorithm == "eagle3"
    assert recipe.base.embedded.architecture.head_dim in (32, 64)


def test_gpu_recipe_is_realistic():
    recipe = load_recipe("llama3.1-8b-eagle3")
    assert recipe.training.use_gpu and recipe.synthesis.use_gpu
    assert recipe.draft.eagle.draft_vocab_size == 32000
    assert recipe.quantization.format == "fp8"


def test_unknown_key_names_file_key_and_line(tmp_path):
    path = write(tmp_path, """\
        name: x
        training:
          steps: 10
          lrr: 0.1
        """)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message
    assert "unknown key 'training.lrr'" in message
    assert f"{path}:4" in message


def test_mistyped_value_names_key(tmp_path):
    path = write(tmp_path, """\
        name: x
        training:
          zero_stage: 5
        """)
    with pytest.raises(RecipeError, match=r"recipe.yaml:3: key 'training.zero_stage'"):
        load_recipe(path)


def test_missing_name_is_reported(tmp_path):
    with pytest.raises(RecipeError, match="missing required key 'name'"):
        load_recipe(write(tmp_path, "training: {steps: 3}\n"))


def test_malformed_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed\n"))


def test_missing_recipe_lists_the_shipped_ones():
    with pytest.raises(RecipeError, match="tiny-eagle3"):
        load_recipe("no-such-recipe")


def test_overrides_are_validated_by_the_schema():
    recipe = load_recipe("tiny-eagle3", ["training.lr=2e-4", "draft.algorithm=medusa"])
    assert recipe.training.lr == pytest.approx(2e-4)
    assert recipe.draft.algorithm == "medusa"
    with pytest.raises(RecipeError, match="unknown key 'training.nope'"):
        load_recipe("tiny-eagle3", ["training.nope=1"])
    with pytest.raises(RecipeError, match="draft.algorithm"):
        load_recipe("tiny-eagle3", ["draft.algorithm=lookahead"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe("tiny-eagle3", ["training.lr"])


def test_cross_field_checks_name_both_fields(tmp_path):
    with pytest.raises(RecipeError, match="num_speculative_tokens.*max_draft_len"):
        load_recipe("tiny-eagle3", ["evaluation.num_speculative_tokens=5"])
    with pytest.raises(RecipeError, match="data.sources"):
        load_recipe("tiny-eagle3", [f"base.model={tmp_path}"])
    with pytest.raises(RecipeError, match="head_dim"):
        load_recipe("tiny-eagle3", ["base.embedded.architecture.hidden_size=100"])


def test_what_an_algorithm_cannot_do_is_refused_at_the_door():
    """Each a one-line error naming the keys, from the algorithm's own capabilities and runtimes."""
    dflash = ["draft.algorithm=dflash", "quantization.format=none"]
    assert load_recipe("tiny-eagle3", dflash).draft.dflash.block_size == 4
    with pytest.raises(RecipeError, match="unknown draft algorithm 'eagle2'; the registered ones are eagle3, eagle1, "
                                          "medusa, dflash"):
        load_recipe("tiny-eagle3", ["draft.algorithm=eagle2"])
    with pytest.raises(RecipeError, match="serving.engine=trtllm cannot serve draft.algorithm=dflash"):
        load_recipe("tiny-eagle3", [*dflash, "serving.engine=trtllm"])
    with pytest.raises(RecipeError, match=r"export.targets=\['trtllm'\]: none of them runs draft.algorithm=medusa"):
        load_recipe("tiny-eagle3", ["draft.algorithm=medusa", "export.targets=[trtllm]"])
    with pytest.raises(RecipeError, match="draft.algorithm=dflash has no quantized export yet"):
        load_recipe("tiny-eagle3", ["draft.algorithm=dflash"])
    with pytest.raises(RecipeError, match="draft.algorithm=medusa does not train from them"):
        load_recipe("tiny-eagle3", ["draft.algorithm=medusa", "training.base_features=offline"])


def test_settings_hash_tracks_changes():
    a = load_recipe("tiny-eagle3")
    b = load_recipe("tiny-eagle3", ["base.embedded.corpus.seed=1"])
    assert settings_hash(a.base) == settings_hash(load_recipe("tiny-eagle3").base)
    assert settings_hash(a.base) != settings_hash(b.base)
    assert settings_hash(a.training) == settings_hash(b.training)
