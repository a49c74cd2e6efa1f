"""configs/fashion.py: every variant is a valid config with the documented scaling."""
import pytest

from configs import fashion
from fp_jax import config as config_lib


@pytest.mark.parametrize("variant", [v + s + l for v in fashion.VARIANTS
                                     for s in ("", "_random") for l in ("", "_long", "_best")])
def test_every_variant_validates(variant):
  config = fashion.get_config(variant)
  config_lib.validate(config)
  assert config.data.name == "fashion_mnist" and config.data.flip and config.data.crop_pad == 2
  assert config.search.policy == ("random" if "_random" in variant else "controller")
  a, b = (float(t[1:]) for t in variant.split("_")[:2])
  assert config.search.beta == b
  cells = config.search.num_layers + 2
  # a keeps the paper's weight: Ratio sums over `cells` searched cells instead of 8
  assert config.search.alpha == pytest.approx(a * 8 / cells)
  if "_long" in variant:
    assert (config.search.num_layers, config.final.num_layers, config.final.epochs) == (6, 15, 630)
    assert config.search.alpha == a


def test_default_is_fake_pruning_and_bad_variant_is_one_line():
  assert fashion.get_config().search.alpha == pytest.approx(0.032)
  with pytest.raises(ValueError, match="unknown variant; allowed: a0_b0, a0.02_b0"):
    fashion.get_config("a0.3_b20")
