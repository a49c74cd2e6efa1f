"""bench/fused_parts.py: the variant without pointwise convs drops exactly their GEMMs."""

import numpy as np

from bench import fused_parts

def test_without_pointwise_drops_two_gemms_per_sep_conv_and_keeps_the_rest():
  args = fused_parts.parse(["--num_layers", "1", "--image", "8", "--out_filters", "8",
                            "--no_runtimes"])
  fns, counts, net, x = fused_parts.build(args)
  seps = sum(n.kind == "sep" for n in net.plan.nodes)
  assert seps > 0
  full, cut = counts["fused"], counts["fused_without_pointwise"]
  assert full["dots"] - cut["dots"] == 2 * seps
  assert full["custom_calls"] == cut["custom_calls"]   # every depthwise kept
  assert fns["fused"]().shape == fns["fused_without_pointwise"]().shape == (1, 10)
  assert not np.allclose(np.asarray(fns["fused"]()), np.asarray(fns["fused_without_pointwise"]()))
  r = {"args": vars(args), "cpu": {"model": "m", "isa": ["AVX2"]}, "load_start": (1, 1, 1),
       "load_end": (1, 1, 1), "ops": counts, "median_ms": {"fused": 2.0,
                                                           "fused_without_pointwise": 1.5},
       "pointwise_ms": 0.5, "pointwise_share": 0.25}
  md = fused_parts.markdown(r)
  assert f"| fused | 2.0000 | {full['dots']} |" in md and "(25 % of" in md
