"""CIFAR-10, the paper's search settings (DESIGN §5), fake-pruning reward a=0.02, b=20.

  python -m fp_jax.main --config=configs/cifar.py --workdir=runs/cifar

CIFAR-10 must be prepared for TFDS first (`tfds build cifar10`, or point
--config.data.tfds_data_dir at a prepared copy); nothing is downloaded quietly.
"""
from configs import default


def get_config():
  return default.get_config()
