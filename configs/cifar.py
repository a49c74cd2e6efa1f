"""CIFAR-10, the paper's settings (DESIGN §5): search, final training, compression.

The paper's experiments are variants named a<alpha>_b<beta>[_cutout]:

  python -m fp_jax.main --config=configs/cifar.py:a0.02_b20 --workdir=runs/a0.02_b20
  python -m fp_jax.main --config=configs/cifar.py:a0.02_b20_cutout --workdir=runs/a0.02_b20_cutout
  python -m fp_jax.main --config=configs/cifar.py:a0.5_b20 --workdir=runs/a0.5_b20
  python -m fp_jax.main --config=configs/cifar.py:a0.5_b20_cutout --workdir=runs/a0.5_b20_cutout
  python -m fp_jax.main --config=configs/cifar.py:a0.02_b0 --workdir=runs/a0.02_b0
  python -m fp_jax.main --config=configs/cifar.py:a0.02_b0_cutout --workdir=runs/a0.02_b0_cutout
  python -m fp_jax.main --config=configs/cifar.py:a0.005_b5 --workdir=runs/a0.005_b5
  python -m fp_jax.main --config=configs/cifar.py:a0.005_b5_cutout --workdir=runs/a0.005_b5_cutout

Without a variant (`--config=configs/cifar.py`) it is a0.02_b20. Published results
(error %, multiply-adds M, params M): a0.02_b20 3.85 / 306 / 1.7 (cutout 3.27);
a0.5_b20 4.9 / 206 / 1.1 (cutout 4.31); a0.02_b0 4.3 / 321 / 1.8; a0.005_b5
3.71 / 422 / 2.4 (cutout 3.11). Cutout (16x16) applies to final training and
fine-tuning only; the search is the same with and without it.

CIFAR-10 must be prepared for TFDS first: `python -m fp_jax.prepare cifar10
[--data_dir DIR]` (then --config.data.tfds_data_dir=DIR unless DIR is TFDS's default), or
offline `--manual_dir ARCHIVES` with ARCHIVES/cifar-10-binary.tar.gz. Runs never download.
"""
from configs import default
from configs import sweep

SWEEP = sweep.Sweep("configs/cifar.py", ("a0.02_b20", "a0.5_b20", "a0.02_b0", "a0.005_b5"),
                    default="a0.02_b20", options=(("_cutout",),))


def get_config(variant=""):
  setting, (cutout,) = SWEEP.parse(variant)
  config = default.get_config()
  config.search.alpha, config.search.beta = sweep.alpha_beta(setting)
  config.final.cutout = 16 if cutout else 0
  return config
