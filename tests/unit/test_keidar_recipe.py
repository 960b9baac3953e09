"""models/keidar2021.yaml: the paper's ensemble as a training recipe a site runs on its archive."""

from __future__ import annotations

from pathlib import Path

from cxr_node.training.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "models" / "keidar2021.yaml"


def test_recipe_names_the_papers_networks() -> None:
    """The recipe loads and trains ResNet34, ResNet50, ResNet152 and VGG16 from ImageNet at 224 px."""
    recipe = load_recipe(RECIPE, data=Path("site.csv"), out=Path("out"))
    assert [m.architecture for m in recipe.classifier.members] == ["resnet34", "resnet50", "resnet152", "vgg16"]
    assert recipe.classifier.pretrained
    assert recipe.classifier.input_size == 224
    assert recipe.classifier.region == "crop+mask"
    assert (recipe.name, recipe.data) == ("keidar2021", Path("site.csv"))
