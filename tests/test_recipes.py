from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from vla.errors import UserError
from vla.recipes import load_recipe, to_dict


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: Optional[float] = 1.0
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass
class Recipe:
    model: str = "vla-tiny-clip"
    train: Train = field(default_factory=Train)


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_resolve_into_typed_config(tmp_path):
    p = write(tmp_path, "kind: pretrain\nmodel: m\ntrain:\n  lr: 1\n  betas: [0.8, 0.9]\n")
    cfg = load_recipe(Recipe, p, ["train.steps=5", "train.grad_clip=null", "train.precision=bf16"], kind="pretrain")
    assert cfg.model == "m" and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 5 and cfg.train.grad_clip is None and cfg.train.betas == (0.8, 0.9)
    assert to_dict(cfg)["train"]["precision"] == "bf16"


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 1\n")
    with pytest.raises(UserError, match=r"r\.yaml: unknown key 'train\.lrr'"):
        load_recipe(Recipe, p)


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  steps: ten\n")
    with pytest.raises(UserError, match=r"r\.yaml: 'train\.steps' must be an integer, got 'ten'"):
        load_recipe(Recipe, p)
    with pytest.raises(UserError, match=r"'train\.precision' must be one of"):
        load_recipe(Recipe, None, ["train.precision=fp8"])


def test_recipe_for_another_stage_is_refused(tmp_path):
    p = write(tmp_path, "kind: distill\n")
    with pytest.raises(UserError, match="is for 'distill', not 'pretrain'"):
        load_recipe(Recipe, p, kind="pretrain")


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(Recipe, tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(Recipe, write(tmp_path, "train: [\n"))


@pytest.mark.parametrize("override,named", [("long_caption_prob=1.5", "long_caption_prob"),
                                            ("ema_momentum=-0.1", "ema_momentum"),
                                            ("reg_weight=-1", "reg_weight")])
def test_contrast_tune_recipe_values_out_of_range_are_refused(override, named):
    from vla.stages.contrast_tune import ContrastTuneRecipe

    with pytest.raises(UserError, match=named):
        recipe = Path(__file__).resolve().parent.parent / "recipes" / "embedded" / "proclip" / "contrast-tune.yaml"
        load_recipe(ContrastTuneRecipe, recipe, [override])


# --- the shipped recipes: recipes/<scale>/<method>/ ------------------------------------------------
RECIPES_ROOT = Path(__file__).resolve().parent.parent / "recipes"


def test_shipped_recipes_are_scale_then_method_and_all_validate():
    """Every shipped recipe is recipes/<scale>/<method>/<stage>.yaml, or, shared by every method,
    recipes/<scale>/{pretrain,synth}.yaml; each validates against its stage's recipe class."""
    from vla.recipes import METHODS, SCALES, read_yaml
    from vla.stages import recipe_class

    files = sorted(RECIPES_ROOT.rglob("*.yaml"))
    assert len(files) > 40
    for f in files:
        parts = f.relative_to(RECIPES_ROOT).parts
        assert parts[0] in SCALES, f
        assert (len(parts) == 3 and parts[1] in METHODS) or parts[1:] in (("pretrain.yaml",), ("synth.yaml",)), f
        kind = read_yaml(f)["kind"]
        load_recipe(recipe_class(kind), f, kind=kind)


def test_a_recipe_path_of_the_flat_layout_names_where_it_is_now(monkeypatch):
    """recipes/embedded/distill.yaml, recipes/proclip/distill.yaml, recipes/synth.yaml: one line
    (exit 2) naming the recipe's path in recipes/<scale>/<method>/, from any command."""
    from typer.testing import CliRunner

    from vla.cli import app

    monkeypatch.chdir(RECIPES_ROOT.parent)
    runner = CliRunner()
    for old, new in (("recipes/embedded/distill.yaml", "recipes/embedded/proclip/distill.yaml"),
                     ("recipes/proclip/distill.yaml", "recipes/gpu/proclip/distill.yaml"),
                     ("recipes/smoke/train-teacher.yaml", "recipes/smoke/dclip/train-teacher.yaml"),
                     ("recipes/synth.yaml", "recipes/embedded/synth.yaml")):
        r = runner.invoke(app, ["recipe", "show", old])
        assert r.exit_code == 2 and f"recipe {old} is now {new} " in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["pretrain-lm", "--data", "d", "--out", "/tmp/vla-never", "--recipe",
                            "recipes/embedded/pretrain-lm.yaml"])
    assert r.exit_code == 2 and "is now recipes/embedded/mmgem/pretrain-lm.yaml" in r.output, r.output
    r = runner.invoke(app, ["recipe", "show", "recipes/smoke/eval.yaml"])  # ProCLIP's and DCLIP's
    assert "is now recipes/smoke/proclip/eval.yaml or recipes/smoke/dclip/eval.yaml" in r.output
