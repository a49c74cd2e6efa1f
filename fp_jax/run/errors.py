"""RunError: a run cannot go on (corrupt checkpoint, NaN loss, ...); main prints one `error:` line."""


class RunError(Exception):
  pass
