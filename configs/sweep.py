"""Named variants of an experiment file: `--config=configs/FILE.py:NAME`.

NAME is one of the file's settings, then at most one suffix of each option group, groups in
order (configs/fashion.py: `a0.02_b20_random_long`). Settings named a<alpha>_b<beta> give the
reward's a and b (`alpha_beta`).
"""
from __future__ import annotations

import dataclasses
import itertools


@dataclasses.dataclass(frozen=True)
class Sweep:
  file: str                  # configs/FILE.py (error messages)
  settings: tuple            # the first part of a name
  default: str               # the setting of an empty name
  options: tuple = ()        # option groups, each a tuple of suffixes

  def variants(self):
    """{name: (setting, (suffix or '' of each option group))} of every variant, in order."""
    groups = [("",) + g for g in self.options]
    return {s + "".join(c): (s, c) for s in self.settings for c in itertools.product(*groups)}

  def parse(self, name):
    """variants()[name] ('': the default setting); ValueError naming what is allowed."""
    name = name or self.default
    if name not in self.variants():
      with_options = ", then ".join(" or ".join(g) for g in self.options)
      raise ValueError(f"{self.file}:{name}: unknown variant; allowed: "
                       f"{', '.join(self.settings)}"
                       + (f", each optionally with {with_options}" if self.options else ""))
    return self.variants()[name]


def alpha_beta(setting):
  """(a, b) of a setting named a<a>_b<b>: 'a0.02_b20' -> (0.02, 20.0)."""
  a, b = setting.split("_")
  return float(a[1:]), float(b[1:])
