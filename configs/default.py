"""Shared defaults: the paper's settings (DESIGN §5), imported by the experiment configs."""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = "search"
  config.overwrite = False

  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10"
  config.data.valid_size = 5000        # held out of train for the controller's rewards
  config.data.crop_pad = 4
  config.data.flip = True
  config.data.tfds_data_dir = ""

  s = config.search = ml_collections.ConfigDict()
  s.epochs = 150
  s.steps_per_epoch = 0                # 0: a full pass over the training data
  s.batch_size = 160
  s.eval_batch_size = 160              # validation minibatch of one reward
  s.num_layers = 6
  s.out_filters = 20
  s.alpha = 0.02                       # a of the reward; 0 is plain ENAS
  s.beta = 20.0                        # b of the reward
  s.ratio_choices = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
  s.importance = "l1"                  # l1 | bn
  s.uniform_child_epochs = 0           # warm-up epochs training the supernet on uniform arcs
  s.controller_updates = 30            # per epoch
  s.controller_samples = 10            # architectures per update
  s.lr_max = 0.05
  s.lr_min = 0.0005
  s.lr_t0 = 10                         # epochs of the first cosine cycle
  s.lr_tmul = 2
  s.momentum = 0.9
  s.l2 = 1e-4
  s.aux_weight = 0.4
  s.grad_clip = 5.0
  s.num_candidates = 5                 # best distinct samples re-evaluated at the end
  s.final_eval_batches = 10            # validation batches for that re-evaluation

  c = config.controller = ml_collections.ConfigDict()
  c.lstm_size = 64
  c.temperature = 5.0
  c.tanh_constant = 1.1
  c.op_tanh_reduce = 2.5
  c.entropy_weight = 1e-4
  c.baseline_decay = 0.99
  c.lr = 0.0035

  f = config.final = ml_collections.ConfigDict()
  f.arc = ""                           # 40 ints; empty: take search/arch.json
  f.num_layers = 15
  f.out_filters = 36
  f.batch_size = 144
  f.epochs = 630
  f.steps_per_epoch = 0
  f.cutout = 0
  return config
