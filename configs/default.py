"""Shared defaults: the paper's settings (DESIGN §5), imported by the experiment configs.

Every field the program reads is here, with its default; fp_jax/config.py FIELDS says what
each allows (code reads fields directly, never with a fallback of its own).
"""
import os

import ml_collections

from fp_jax import data


LATENCY_TABLE_DIR = "~/.cache/fp_jax/latency_tables"   # search.latency_table_dir's default


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = "search,final,compress,latency"
  config.overwrite = False
  config.dtype = "float32"             # compute dtype: float32 | bfloat16 (params, BN stats,
                                       # losses, optimizer state stay float32)
  config.matmul_precision = "auto"     # float32 convs/dots: auto (float32 on CPU and GPU,
                                       # bfloat16 passes on TPU) | float32 | tensorfloat32 |
                                       # bfloat16 (fp_jax/run/precision.py); config.json
                                       # records the resolved value
  config.preemption_sync_steps = 10    # multi-process runs agree on a SIGTERM every N steps
                                       # (one small all-gather); one process: every step

  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10"
  config.data.valid_size = 5000        # held out of train for the controller's rewards
  config.data.crop_pad = 4
  config.data.flip = True
  config.data.input = "host"           # training batches: host (numpy on the main thread, sent
                                       # as float32) | device (uint8 set on every device once,
                                       # crop/flip/cutout in the step; bitwise the same batches;
                                       # sets over 2 GiB: host, built by a prefetch thread):
                                       # fp_jax/augment.py. Final and compress stages
  config.data.tfds_data_dir = ""       # TFDS datasets: prepared with python -m fp_jax.prepare
  config.data.idx_dir = data.FASHION_MNIST_DIR   # fashion_mnist's IDX files (apt-get install
                                       # dataset-fashion-mnist); else TFDS's

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
  s.importance = "l1"                  # l1 | bn | taylor (|w * dL/dw|) | random
  s.ratio_measure = "layers"           # Ratio of the reward: layers (the paper's sum of
                                       # per-cell ratios) | macs (8 x the fraction of the
                                       # searched network's multiply-adds removed) | latency
                                       # (8 x the fraction of the deployed final network's
                                       # predicted fused CPU latency removed: a table)
  s.latency_table_dir = os.environ.get("FP_JAX_LATENCY_TABLE_DIR", LATENCY_TABLE_DIR)
                                       # cache of measured per-block fused latencies, one file
                                       # per CPU model / jax version (infer/latency_table.py);
                                       # every sample then logs latency_ms, masked_latency_ms.
                                       # "": no table (the tests' default, via that variable)
  s.round_to = 1                       # kept channels of every pruned group rounded up to a
                                       # multiple of N, capped at the group (masks.keep_count);
                                       # 1: the exact count; 8 suits CPU (the fused path pads to
                                       # 8 anyway); use compress.round_to's value
  s.uniform_child_epochs = 0           # warm-up epochs training the supernet on uniform arcs
  s.controller_updates = 30            # per epoch
  s.controller_samples = 10            # architectures per update
  s.policy = "controller"              # controller (ENAS: the LSTM learns) | random (uniform
                                       # draws, same budget, nothing learned: Li & Talwalkar 2019)
  s.lr_max = 0.05
  s.lr_min = 0.0005
  s.lr_t0 = 10                         # epochs of the first cosine cycle
  s.lr_tmul = 2
  s.momentum = 0.9
  s.l2 = 1e-4
  s.aux_weight = 0.4
  s.grad_clip = 5.0                    # global-norm clipping (ENAS's code clips nothing: docs/enas_parity.md)
  s.keep_prob = 0.9                    # dropout before the classifier (ENAS search script)
  s.init_scale = "fan_in"              # fan_in | enas (He-normal on ENAS's 2-D weight shapes)
  s.final_init = "identity"            # cells' final conv rows: identity | shared | enas (independent)
  s.share_inputs = True                # one sep_conv weight set per node and slot (ENAS: per input)
  s.dispatch = "auto"                  # each node slot's sampled op: switch (a conditional per
                                       # slot: only that op runs) | select (no conditional: a 5x5
                                       # sep conv, both pools, a select; more FLOPs) | auto
                                       # (select on GPUs, where each conditional waits for the
                                       # host; switch on CPU and TPU): models/supernet.py
  s.num_candidates = 5                 # best distinct samples re-evaluated at the end
  s.final_eval_batches = 10            # validation batches for that re-evaluation
  s.ckpt_every_steps = 0               # extra checkpoints every N child steps (epoch ends: always)

  c = config.controller = ml_collections.ConfigDict()
  c.lstm_size = 64
  c.temperature = 1.0                  # ENAS micro search: none (1.0)
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
  f.cutout = 0                         # cutout square side (0: off; paper 16)
  f.eval_batch_size = 512              # divisible by 8 and 16 devices
  f.lr_max = 0.05
  f.lr_min = 0.0001
  f.lr_t0 = 10                         # 10 + 20 + 40 + 80 + 160 + 320 = 630 epochs
  f.lr_tmul = 2
  f.momentum = 0.9
  f.l2 = 2e-4
  f.aux_weight = 0.4
  f.grad_clip = 5.0
  f.keep_prob = 0.8                    # dropout before the classifier
  f.drop_path_keep_prob = 0.6          # of the last cell; scaled by depth, ramped over training

  k = config.compress = ml_collections.ConfigDict()
  k.ratios = ""                        # 5 floats (one per stage); empty: search/arch.json
  k.importance = "l1"                  # l1 | bn | taylor (|w * dL/dw| on bn_batches) | random
  k.mode = "finetune"                  # finetune (masks held fixed) | scratch (thin net anew)
  k.finetune_epochs = 20
  k.steps_per_epoch = 0
  k.batch_size = 144
  k.bn_batches = 32                    # training batches re-estimating BN statistics after masking
  k.lr_max = 0.01
  k.lr_min = 0.0001
  k.round_to = 1                       # kept channels rounded up to a multiple of N, capped at
                                       # the group (the masks, compact network and latency
                                       # stage's pruned one); 1: exact; 8 recommended on CPU
  k.distill = False                    # fine-tune with the unpruned network as teacher:
                                       # loss = usual + weight * T^2 * KL(teacher_T || student_T)
  k.distill_weight = 1.0               # weight of that term
  k.distill_temperature = 4.0          # T: both networks' logits divided by it

  t = config.latency = ml_collections.ConfigDict()
  t.init = "trained"                   # trained (final/ and compress/ weights) | random
  t.images = 1000                      # batch-1 latency averaged over this many images
  t.batch_size = 64                    # throughput batch
  t.warmup = 20
  t.im2col = True                      # fused kxk convs (the stem) as im2col + GEMM
  t.pad_channels = 8                   # fused path: channel groups zero-padded to a multiple
  t.dots = "auto"                      # fused/per-op GEMMs on CPU: auto = xla (XLA's emitter,
                                       # on the calling thread) | ynn (YNNPACK)
  t.threads = 0                        # cores for every runtime (0: all usable; see runtimes.py)
  t.engine = "auto"                    # fused path: native (one custom call, every op split
                                       # over the cores; native.py) | xla (XLA's compiled
                                       # graph) | auto: native on CPU where it runs, else xla
  t.micro_batch = 0                    # fused path, a batch larger than this runs as a loop over
                                       # chunks of at most this many images: 0 = auto (on CPU
                                       # chunks sized to the caches; batching.micro_batch_size),
                                       # -1 = the whole batch at once
  return config
