"""The whole pipeline on real offline data (scikit-learn 8x8 digits) in minutes on 2 CPU cores.

  python -m fp_jax.main --config=configs/smoke.py --workdir=runs/smoke
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "digits"
  config.data.valid_size = 256
  config.data.crop_pad = 0             # a 1-pixel shift of an 8x8 digit slows the supernet a lot
  config.data.flip = False             # digits are not mirror-symmetric
  s = config.search
  s.epochs = 20
  s.steps_per_epoch = 0
  s.batch_size = 32
  s.eval_batch_size = 128
  s.num_layers = 3                     # 5 cells, as final: every stage holds a cell, so the
                                       # search rewards the ratios compress applies
  s.out_filters = 16
  s.alpha = 0.032                      # the paper's a = 0.02 scaled by 8 / 5 cells (its Ratio
                                       # sums over 8 searched cells; bench/fake_pruning.py)
  s.beta = 20.0
  s.lr_t0 = 20
  s.uniform_child_epochs = 10          # the controller's sep_conv-heavy start trains slowly
  s.keep_prob = 1.0                    # digits: no dropout before the classifier
  s.lr_max = 0.2                       # with clipping at 1: bench/supernet_learning.py
  s.grad_clip = 1.0
  s.controller_updates = 5
  s.controller_samples = 10
  s.num_candidates = 4
  s.final_eval_batches = 2
  f = config.final
  f.num_layers = 3
  f.out_filters = 8
  f.epochs = 10
  f.batch_size = 64
  f.lr_t0 = 10                         # one cosine cycle
  k = config.compress
  k.finetune_epochs = 10
  k.batch_size = 64
  k.lr_max = 0.02
  return config
