"""Fashion-MNIST: the paper's experiment on real offline data, sized for 2 CPU cores.

Needs the IDX files: `apt-get install dataset-fashion-mnist` (into
/usr/share/datasets/fashion-mnist; elsewhere: --config.data.idx_dir=DIR, or TFDS's prepared
fashion_mnist). Variants a<a>_b<b>[_random][_long|_best]:

  python -m fp_jax.main --config=configs/fashion.py --workdir=runs/fm_a0.02_b20
  python -m fp_jax.main --config=configs/fashion.py:a0_b0 --workdir=runs/fm_a0_b0
  python -m fp_jax.main --config=configs/fashion.py:a0.02_b0 --workdir=runs/fm_a0.02_b0
  python -m fp_jax.main --config=configs/fashion.py:a0.5_b20 --workdir=runs/fm_a0.5_b20
  python -m fp_jax.main --config=configs/fashion.py:a0.02_b20_random --workdir=runs/fm_random
  python -m fp_jax.main --config=configs/fashion.py:a0.02_b20_long --workdir=runs/fm_long  # GPU
  python -m fp_jax.main --config=configs/fashion.py:a0.02_b20_best --workdir=runs/fm_best \
      --config.stages=final,compress,latency --config.final.arc="ARC" --config.compress.ratios="R" \
      --config.final.out_filters=12

(the last: a searched network, ARC and R from its search/arch.json, trained longer; F 12
keeps the compressed a0.02_b20 seed-1 network under 100K parameters, docs/fashion_mnist.md.)
a0_b0 is plain ENAS (TrainAcc only); a0.02_b0 the ratio term alone; a0.02_b20 (the
default) fake pruning; a0.5_b20 the paper's aggressive setting. `_random` replaces the
controller by random search (search.policy=random: same number of rewarded samples, same
final choice). `_long` is the paper's recipe (DESIGN §5: search 6 layers / F 20 / 150
epochs, final 15 layers / F 36 / 630 epochs, full passes) on 28x28x1 images: days on a CPU,
meant for a GPU. `_best` trains a chosen network longer on 2 CPU cores (full passes over the
60,000 training images: 14 final epochs, 2 fine-tuning epochs, ~15,000 steps of 64; 1 h 55
min at F 12 on a 2-core Intel Xeon: 93.17 % test accuracy at 93K parameters,
docs/fashion_mnist.md), everything else as the short recipe.

How the short recipe was scaled (one whole pipeline, search + final + compress + latency,
about 20 minutes on 2 quiet CPU cores: 13-16 min measured on an Intel Xeon, 54 min on a
shared one, docs/fashion_mnist.md):
- the networks: search and final both at 3 layers (5 cells: every stage holds one, so the
  search rewards the ratios compress applies), F 8 in the search and F 16 in the final
  network (the paper widens F 20 -> 36 from search to final);
- subsets per epoch: `steps_per_epoch` fixed, batches of 64, so an "epoch" is 64 x steps
  images drawn from a fresh permutation of the 55,000 training images (5,000 held out for
  the rewards, as in ENAS); the cosine schedules run over the shortened epochs;
- the controller: ENAS makes 30 updates of 10 architectures per epoch for 150 epochs
  (4,500 updates); here 10 epochs x 8 updates, so its Adam learning rate is 10x ENAS's
  0.0035 (and the entropy weight 10x) so that the policy moves in 80 updates
  (docs/fashion_mnist.md shows the controller's reward per epoch beside random search's);
- `a` keeps its meaning: the paper's Ratio sums the per-cell ratios over its searched
  network's 8 cells (6 layers + 2 reductions); at 3 layers there are 5, so search.alpha is
  the variant's a x 8/5 (a0.02 -> 0.032, as configs/smoke.py and bench/fake_pruning.py),
  giving the ratio term the paper's weight against TrainAcc. `_long` searches at 6 layers
  and uses a as it is.
- augmentation fit for the data: zero padding 2 + random 28x28 crop, horizontal flip
  (valid for clothing); no cutout.
"""
from configs import default
from configs import sweep

SWEEP = sweep.Sweep("configs/fashion.py", ("a0_b0", "a0.02_b0", "a0.02_b20", "a0.5_b20"),
                    default="a0.02_b20", options=(("_random",), ("_long", "_best")))
PAPER_CELLS = 8          # the paper's searched network: 6 layers + 2 reduction cells


def get_config(variant=""):
  setting, (random, length) = SWEEP.parse(variant)
  a, b = sweep.alpha_beta(setting)
  config = default.get_config()
  config.data.name = "fashion_mnist"
  config.data.valid_size = 5000
  config.data.crop_pad = 2
  config.data.flip = True
  s = config.search
  s.policy = "random" if random else "controller"
  s.beta = b
  if length == "_long":   # the paper's recipe (configs/default.py) on 28x28x1
    s.alpha = a
    config.final.eval_batch_size = 500
    return config
  s.num_layers = 3
  s.alpha = a * PAPER_CELLS / (s.num_layers + 2)
  s.out_filters = 8
  s.epochs = 10
  s.steps_per_epoch = 60
  s.batch_size = 64
  s.eval_batch_size = 128
  s.lr_max = 0.1
  s.lr_min = 0.001
  s.lr_t0 = 10                         # one cosine cycle
  s.uniform_child_epochs = 2           # the supernet warms up on uniform arcs first
  s.controller_updates = 8
  s.controller_samples = 10
  s.num_candidates = 5
  s.final_eval_batches = 4
  c = config.controller
  c.lr = 0.035                         # 10x ENAS: 80 updates instead of 4,500
  c.entropy_weight = 1e-3
  f = config.final
  f.num_layers = 3
  f.out_filters = 16
  f.batch_size = 64
  f.epochs = 6
  f.steps_per_epoch = 100
  f.lr_max = 0.1
  f.lr_min = 0.0005
  f.lr_t0 = 6
  f.drop_path_keep_prob = 0.9          # short training: light drop-path
  f.eval_batch_size = 500
  k = config.compress
  k.finetune_epochs = 2
  k.steps_per_epoch = 100
  k.batch_size = 64
  k.bn_batches = 16
  k.lr_max = 0.02
  t = config.latency
  t.images = 300
  if length == "_best":
    f.epochs = f.lr_t0 = 14
    f.steps_per_epoch = 0            # full passes
    k.finetune_epochs = 2
    k.steps_per_epoch = 0
    t.images = 1000
  return config
