"""Tests for fp_jax.models.space: the ENAS 40-int architecture string."""
import numpy as np
import pytest

from fp_jax.models import graph
from fp_jax.models import space


def _arc_list(text=space.ENAS_ARC):
  return [int(t) for t in text.split()]


def _with(position, value, text=space.ENAS_ARC):
  arc = _arc_list(text)
  arc[position] = value
  return " ".join(str(v) for v in arc)


def test_constants():
  """The arc format of DESIGN §3 -- 5 nodes of `in_a op_a in_b op_b` per cell, normal then
  reduction cell; ops 0 sep_conv3x3, 1 sep_conv5x5, 2 avg_pool3x3, 3 max_pool3x3,
  4 identity -- is what the constants say, what validate_arc reads, and each op index builds
  the op it names in the fixed network (graph.py)."""
  assert space.NUM_NODES == 5 and space.NUM_OPS == 5
  assert space.CELL_LEN == 20 and space.ARC_LEN == 40
  assert space.OPS == ("sep_conv3x3", "sep_conv5x5", "avg_pool3x3", "max_pool3x3",
                       "identity")
  assert (space.SEP3, space.SEP5, space.AVG, space.MAX, space.IDENTITY) == (0, 1, 2, 3, 4)
  # the largest valid values: node k reads inputs 0..k+1, ops 0..NUM_OPS-1, in both cells
  top = [v for k in range(space.NUM_NODES) for v in (k + 1, space.NUM_OPS - 1) * 2] * 2
  assert len(top) == space.ARC_LEN and space.validate_arc(top).tolist() == top
  for pos in range(space.ARC_LEN):   # one more is out of the format everywhere
    with pytest.raises(ValueError, match=f"position {pos}"):
      space.validate_arc(top[:pos] + [top[pos] + 1] + top[pos + 1:])
  assert [len(c) for c in space.split(top)] == [space.CELL_LEN] * 2
  # op index -> the block the fixed network builds for it (both slots of every node)
  built = {space.SEP3: ("sep", 3), space.SEP5: ("sep", 5), space.AVG: ("avg", 3),
           space.MAX: ("max", 3)}
  for op in range(space.NUM_OPS):
    cell = " ".join(f"0 {op} 1 {op}" for _ in range(space.NUM_NODES))
    plan = graph.build(space.parse_arc(cell + " " + cell), 3, 8, (8, 8, 3), 10)   # cell 0: normal
    slots = [n for n in plan.nodes if "/node" in n.name and n.name[-2] == "/" and n.cell == 0]
    if op == space.IDENTITY:   # the value passes through: no block for the slot
      assert slots == []
    else:
      assert len(slots) == 2 * space.NUM_NODES
      assert {(n.kind, n.k) for n in slots} == {built[op]}, space.OPS[op]


def test_enas_arc_is_valid_and_round_trips():
  arc = space.parse_arc(space.ENAS_ARC)
  assert arc.dtype == np.int32 and arc.shape == (40,)
  assert arc.tolist() == _arc_list()
  assert space.arc_to_string(arc) == space.ENAS_ARC
  assert space.ENAS_ARC == space.ENAS_NORMAL + " " + space.ENAS_REDUCE
  normal, reduce = space.split(arc)
  assert space.arc_to_string(normal) == space.ENAS_NORMAL
  assert space.arc_to_string(reduce) == space.ENAS_REDUCE
  np.testing.assert_array_equal(space.validate_arc(arc), arc)


@pytest.mark.parametrize("text", [
    space.ENAS_ARC,
    " ".join(["0 4 1 4"] * 10),
    " ".join(["0 0 0 0"] * 10),
    # every input at its maximum, every op at its maximum
    " ".join(f"{k + 1} 4 {k + 1} 4" for k in range(5)) + " "
    + " ".join(f"{k + 1} 3 0 2" for k in range(5)),
])
def test_parse_round_trip(text):
  assert space.arc_to_string(space.parse_arc(text)) == text


def test_parse_accepts_commas_and_extra_whitespace():
  text = ", ".join(space.ENAS_ARC.split())
  assert space.arc_to_string(space.parse_arc(text)) == space.ENAS_ARC
  assert space.arc_to_string(space.parse_arc("  " + space.ENAS_ARC.replace(" ", "\n  ")))\
      == space.ENAS_ARC


def test_validate_accepts_lists_and_int64():
  arc = space.validate_arc(_arc_list())
  assert arc.dtype == np.int32 and arc.tolist() == _arc_list()
  arc = space.validate_arc(np.array(_arc_list(), np.int64))
  assert arc.dtype == np.int32


def test_out_of_range_input_names_position():
  # normal cell node 3 (second node, k=1) input a at position 4 may be 0..2
  with pytest.raises(ValueError) as e:
    space.parse_arc(_with(4, 3))
  assert str(e.value) == ("arc: normal cell node 3 input a = 3 (position 4) must be in 0..2")
  # reduction cell node 2 input b (position 22) may be 0..1
  with pytest.raises(ValueError, match=r"reduce cell node 2 input b = 2 \(position 22\)"
                     r" must be in 0\.\.1"):
    space.parse_arc(_with(22, 2))
  with pytest.raises(ValueError, match=r"normal cell node 6 input b = -1 \(position 18\)"
                     r" must be in 0\.\.5"):
    space.parse_arc(_with(18, -1))
  # the largest legal value passes
  space.parse_arc(_with(4, 2))
  space.parse_arc(_with(38, 5))


def test_out_of_range_op_names_position():
  with pytest.raises(ValueError) as e:
    space.parse_arc(_with(1, 5))
  assert str(e.value) == "arc: normal cell node 2 op a = 5 (position 1) must be in 0..4"
  with pytest.raises(ValueError, match=r"reduce cell node 6 op b = -1 \(position 39\)"
                     r" must be in 0\.\.4"):
    space.parse_arc(_with(39, -1))
  with pytest.raises(ValueError, match=r"position 23"):
    space.validate_arc(np.array(_arc_list(_with(23, 7))))


@pytest.mark.parametrize("n", [0, 1, 20, 39, 41, 80])
def test_wrong_length(n):
  text = " ".join(["0"] * n)
  with pytest.raises(ValueError) as e:
    space.parse_arc(text)
  assert str(e.value) == (f"arc must have 40 ints (normal cell then reduction cell, "
                          f"4 per node), got {n}")
  with pytest.raises(ValueError, match=f"40 ints.*got {n}$"):
    space.validate_arc(np.zeros(n, np.int32))


@pytest.mark.parametrize("bad", ["x", "1.5", "1e3", "0x1", "one"])
def test_non_integers(bad):
  text = _with(7, 0).split()
  text[7] = bad
  text = " ".join(text)
  with pytest.raises(ValueError) as e:
    space.parse_arc(text)
  assert str(e.value).startswith("arc must be 40 integers separated by spaces, got ")
  assert bad in str(e.value)


def test_validate_rejects_float_array():
  with pytest.raises(ValueError, match="arc must contain integers"):
    space.validate_arc(np.array(_arc_list(), np.float32))
  with pytest.raises(ValueError, match="arc must contain integers"):
    space.validate_arc(np.array(_arc_list(), bool))


def test_sample_uniform_valid_and_covers_everything():
  inputs_seen = [[set(), set()] for _ in range(space.NUM_NODES)]
  ops_seen = set()
  for seed in range(300):
    arc = space.sample_uniform(np.random.default_rng(seed))
    assert arc.dtype == np.int32 and arc.shape == (40,)
    np.testing.assert_array_equal(space.validate_arc(arc), arc)
    assert space.arc_to_string(space.parse_arc(space.arc_to_string(arc))) \
        == space.arc_to_string(arc)
    rows = arc.reshape(2, space.NUM_NODES, 4)
    for c in range(2):
      for k in range(space.NUM_NODES):
        inputs_seen[k][c] |= {int(rows[c, k, 0]), int(rows[c, k, 2])}
        ops_seen |= {int(rows[c, k, 1]), int(rows[c, k, 3])}
  assert ops_seen == set(range(space.NUM_OPS))
  for k in range(space.NUM_NODES):
    for c in range(2):
      assert inputs_seen[k][c] == set(range(k + 2)), (k, c)


def test_sample_uniform_is_deterministic_per_seed_and_varies():
  a = space.sample_uniform(np.random.default_rng(7))
  b = space.sample_uniform(np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)
  distinct = {space.arc_to_string(space.sample_uniform(np.random.default_rng(s)))
              for s in range(20)}
  assert len(distinct) == 20


def test_sample_uniform_is_roughly_uniform():
  rng = np.random.default_rng(0)
  arcs = np.stack([space.sample_uniform(rng) for _ in range(2000)])
  ops = arcs.reshape(-1, 4)[:, [1, 3]].reshape(-1)
  freq = np.bincount(ops, minlength=space.NUM_OPS) / ops.size
  np.testing.assert_allclose(freq, 0.2, atol=0.02)
  # the last node's inputs are uniform over 0..5
  last = arcs[:, [16, 18, 36, 38]].reshape(-1)
  np.testing.assert_allclose(np.bincount(last, minlength=6) / last.size, 1 / 6, atol=0.02)


# A hand-made cell: node2 = sep3(h0) + id(h1); node3 = max(node2) + avg(h0);
# node4 = sep5(node2) + id(node3); node5 = id(h1) + sep3(h1);
# node6 = avg(node5) + max(node2). Used: h0, h1, node2, node3, node5 -> output node4, node6.
HAND_CELL = [0, 0, 1, 4,
             2, 3, 0, 2,
             2, 1, 3, 4,
             1, 4, 1, 0,
             5, 2, 2, 3]


def test_used_and_output_nodes():
  used = space.used_nodes(HAND_CELL)
  assert used.dtype == bool
  assert used.tolist() == [True, True, True, True, False, True, False]
  assert space.output_nodes(HAND_CELL) == [4, 6]
  assert space.output_nodes(np.array(HAND_CELL).reshape(5, 4)) == [4, 6]
  # nothing feeds from a node: all five are concatenated; h0 unused
  chain = [1, 4, 1, 4] * 5
  assert space.used_nodes(chain).tolist() == [False, True] + [False] * 5
  assert space.output_nodes(chain) == [2, 3, 4, 5, 6]
  # a chain: each node feeds the next, only node6 is output
  chain = [0, 0, 1, 0] + [2, 4, 2, 4] + [3, 4, 3, 4] + [4, 4, 4, 4] + [5, 4, 5, 4]
  assert space.used_nodes(chain).tolist() == [True] * 6 + [False]
  assert space.output_nodes(chain) == [6]


def test_output_nodes_of_enas_arc():
  normal, reduce = space.split(space.parse_arc(space.ENAS_ARC))
  # ENAS normal: nodes 2..6 take inputs from {0, 1} only
  assert space.output_nodes(normal) == [2, 3, 4, 5, 6]
  # ENAS reduce: only node4 reads a node (node3)
  assert space.output_nodes(reduce) == [2, 4, 5, 6]


def test_render_cell():
  text = space.render_cell(HAND_CELL, "my cell")
  lines = text.split("\n")
  assert lines[0] == "my cell:"
  assert lines[1] == "  node2 = sep_conv3x3(h[i-2]) + identity(h[i-1])"
  assert lines[2] == "  node3 = max_pool3x3(node2) + avg_pool3x3(h[i-2])"
  assert lines[3] == "  node4 = sep_conv5x5(node2) + identity(node3)"
  assert lines[4] == "  node5 = identity(h[i-1]) + sep_conv3x3(h[i-1])"
  assert lines[5] == "  node6 = avg_pool3x3(node5) + max_pool3x3(node2)"
  assert lines[6] == "  output = concat(node4, node6)"
  assert len(lines) == 7
  for op in space.OPS:
    assert op in text


def test_render_arc():
  text = space.render_arc(space.parse_arc(space.ENAS_ARC))
  assert text.startswith("normal cell:\n")
  assert "\nreduction cell:\n" in text
  assert text.count("output = concat(") == 2
  assert "  output = concat(node2, node3, node4, node5, node6)" in text
  assert "  output = concat(node2, node4, node5, node6)" in text
  assert text.count("node2 = ") == 2


@pytest.mark.parametrize("num_layers,expected", [
    (1, (0, 1)), (3, (1, 3)), (6, (2, 5)), (15, (5, 11))])
def test_reduction_layers(num_layers, expected):
  assert space.reduction_layers(num_layers) == expected


@pytest.mark.parametrize("num_layers,expected", [
    (1, [1, 3, 4]),
    (3, [0, 1, 2, 3, 4]),
    (6, [0, 0, 1, 2, 2, 3, 4, 4]),
    (15, [0] * 5 + [1] + [2] * 5 + [3] + [4] * 5),
])
def test_stage_of_layer(num_layers, expected):
  stages = space.stage_of_layer(num_layers)
  assert stages == expected
  assert len(stages) == num_layers + 2
  r1, r2 = space.reduction_layers(num_layers)
  assert [i for i, s in enumerate(stages) if s in (1, 3)] == [r1, r2]
