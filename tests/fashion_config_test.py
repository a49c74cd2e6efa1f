"""configs/fashion.py: every variant is a valid config with the documented scaling, what
each part of its name changes, and the docstring's commands."""
import re

import pytest

from configs import default
from configs import fashion
from fp_jax import config as config_lib

# what each option changes, field by field: _random over the same name without it, _best
# over the short recipe, _long (the paper's recipe) over configs/default.py
RANDOM = {"search.policy": "random"}
BEST = {"compress.steps_per_epoch": 0, "final.epochs": 14, "final.lr_t0": 14, "final.steps_per_epoch": 0, "latency.images": 1000}
LONG = {"data.name": "fashion_mnist", "data.crop_pad": 2, "final.eval_batch_size": 500}


def _set(base, changes):
  """base's fields ({dotted path: value}) with `changes` over them."""
  return {**config_lib.fields(base), **changes}


@pytest.mark.parametrize("variant", list(fashion.SWEEP.variants()))
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


@pytest.mark.parametrize("variant", list(fashion.SWEEP.variants()))
def test_what_each_part_of_a_name_changes(variant):
  """Field by field: a setting sets a (x 8/5 on the short recipe's 5 cells) and b only,
  _random the policy only, _best BEST over the short recipe, _long LONG over default.py."""
  setting, (random, length) = fashion.SWEEP.parse(variant)
  a, b = (float(t[1:]) for t in setting.split("_"))
  got = config_lib.fields(fashion.get_config(variant))
  if random:
    assert got == _set(fashion.get_config(variant.replace("_random", "")), RANDOM)
  if length == "_long":
    assert got == _set(default.get_config(), {**LONG, **(RANDOM if random else {}),
                                              "search.alpha": a, "search.beta": b})
  elif length == "_best":
    assert got == _set(fashion.get_config(variant.replace("_best", "")), BEST)
  else:
    assert got == _set(fashion.get_config("a0.02_b20" + random),
                       {"search.alpha": a * 8 / 5, "search.beta": b})


def test_documented_commands_are_variants():
  documented = re.findall(r"--config=configs/fashion\.py(?::(\S+))? ", fashion.__doc__)
  assert len(documented) == 7 and documented[0] == ""   # the first: the default, a0.02_b20
  assert set(documented[1:]) <= set(fashion.SWEEP.variants())
  assert fashion.get_config().to_json() == fashion.get_config("a0.02_b20").to_json()
