"""The tiny search config the tests share: configs/smoke.py (digits) with a 2-cell supernet of
F 8, batches of 32, rewards on 64 images, one epoch of full passes on uniform arcs and one
controller update of 4 samples; a test file binds its own settings over these."""
from configs import smoke

SEARCH = dict(num_layers=0, out_filters=8, batch_size=32, eval_batch_size=64, epochs=1,
              steps_per_epoch=0, controller_updates=1, controller_samples=4, num_candidates=2,
              final_eval_batches=1, uniform_child_epochs=100)


def tiny_config(seed=0, **search):
  """smoke.py with config.seed = seed and search.* = SEARCH updated by `search`."""
  config = smoke.get_config()
  config.seed = seed
  for k, v in {**SEARCH, **search}.items():
    config.search[k] = v
  return config
