"""Prepares a TFDS dataset once, so that runs can read it (a run never downloads).

  python -m fp_jax.prepare cifar10 [--data_dir DIR] [--manual_dir DIR] [--download_dir DIR]

Downloads the dataset's archives, or takes them from --manual_dir (offline: the files as
published, e.g. cifar-10-binary.tar.gz; TFDS checks their size and sha256 either way), and
writes TFDS's prepared copy under --data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
Bad input ends with one `error: ...` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import urllib.parse
import urllib.request

from fp_jax import data


class PrepareError(ValueError):
  """Bad input; message starts with the argument, e.g. '--manual_dir: ...'."""


def fail(message):
  """Prints one `error:` line and exits with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


def _reason(e: Exception, lines: int = 1, limit: int = 400) -> str:
  """The first `lines` non-empty lines of an exception message, with its type, shortened."""
  text = " ".join([l.strip() for l in str(e).splitlines() if l.strip()][:lines])
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _builder(tfds, name: str, data_dir: str):
  """tfds.builder(name), or PrepareError naming NAME."""
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.DatasetNotFoundError as e:
    close = re.search(r"Did you mean: \S+ -> (\S+)", str(e))
    hint = f"did you mean {close.group(1)!r}? " if close else ""
    raise PrepareError(f"NAME: unknown TFDS dataset {name!r}; {hint}e.g. cifar10 or "
                       f"fashion_mnist (tfds.list_builders() lists all)") from e
  except Exception as e:  # pylint: disable=broad-except
    raise PrepareError(f"NAME: cannot build TFDS dataset {name!r}: {_reason(e)}") from e


def _archives(url_infos) -> list[tuple[str, str]]:
  """(url, file name) of every archive TFDS has a registered checksum for."""
  return sorted((url, info.filename or os.path.basename(urllib.parse.urlsplit(url).path))
                for url, info in (url_infos or {}).items())


def _offline_hint(archives) -> str:
  names = ", ".join(f"{f} (from {u})" for u, f in archives) or "the dataset's archives"
  return f"on a machine without internet put {names} in a directory DIR and pass --manual_dir DIR"


def check_manual_dir(manual_dir: str, archives) -> None:
  """Every archive must be in manual_dir under its published name (nothing is downloaded)."""
  if not os.path.isdir(manual_dir):
    raise PrepareError(f"--manual_dir: {manual_dir!r} is not a directory")
  missing = [(u, f) for u, f in archives if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise PrepareError(
        f"--manual_dir: {manual_dir!r} has no "
        f"{', '.join(f'{f} (download it from {u})' for u, f in missing)}; "
        f"put the file(s) there under exactly that name, or leave out --manual_dir to download")


def check_hosts(archives) -> None:
  """Fails at once when an archive's host does not resolve (no proxy set), rather than after
  TFDS's minutes of retries."""
  proxies = urllib.request.getproxies()
  for url, _ in archives:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https", "ftp") or parts.scheme in proxies:
      continue
    try:
      socket.getaddrinfo(parts.hostname, parts.port)
    except OSError as e:
      raise PrepareError(f"NAME: cannot reach {parts.hostname} to download {url} "
                         f"({_reason(e)}); {_offline_hint(archives)}") from e


def prepare(name: str, *, data_dir: str = "", manual_dir: str = "",
            download_dir: str = "") -> tuple[str, bool]:
  """Downloads (or takes from manual_dir) and prepares TFDS dataset `name`.

  Returns:
    (the prepared dataset's directory, whether it was already prepared).

  Raises:
    PrepareError: bad input, a missing or wrong archive, a failed download.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # TF loads lazily.
  builder = _builder(tfds, name, data_dir)
  if builder.data_path.exists() and builder.is_prepared():
    return os.fspath(builder.data_dir), True
  archives = _archives(builder.url_infos)
  downloads = download_dir or os.path.join(os.fspath(builder.data_dir_root), "downloads")
  if manual_dir:
    check_manual_dir(manual_dir, archives)
  elif not os.path.isdir(os.path.join(downloads, builder.name)):  # Else TFDS may have them.
    check_hosts(archives)
  data.hide_accelerators_from_tf()
  config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  try:
    builder.download_and_prepare(download_dir=download_dir or None, download_config=config)
  except ModuleNotFoundError:
    raise  # An incomplete install, not bad input.
  except Exception as e:  # pylint: disable=broad-except
    raise _download_error(e, name, manual_dir, archives) from e
  return os.fspath(builder.data_dir), False


def _download_error(e: Exception, name: str, manual_dir: str, archives) -> PrepareError:
  """The PrepareError for an exception out of download_and_prepare."""
  import requests  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import download_manager  # pylint: disable=g-import-not-at-top
  if isinstance(e, download_manager.NonMatchingChecksumError):  # Expected and got: 3 lines.
    if manual_dir:
      return PrepareError(f"--manual_dir: {_reason(e, 3, 1000)}: not the published file; "
                          f"download it again ({', '.join(u for u, _ in archives)})")
    return PrepareError(f"NAME: {_reason(e, 3, 1000)}: a damaged download; run again")
  if isinstance(e, (requests.RequestException, ConnectionError, tfds.download.DownloadError)):
    return PrepareError(f"NAME: could not download {name!r} ({_reason(e)}); "
                        f"{_offline_hint(archives)}")
  return PrepareError(f"NAME: could not prepare TFDS dataset {name!r}: {_reason(e)}")


def parse_args(argv):
  """Command-line arguments; an error exits through `fail`."""

  class Parser(argparse.ArgumentParser):
    def error(self, message):
      fail(message)

  parser = Parser(prog="python -m fp_jax.prepare", description=__doc__.splitlines()[0])
  parser.add_argument("name", metavar="NAME", help="TFDS dataset name: cifar10, fashion_mnist, ...")
  parser.add_argument("--data_dir", default="",
                      help="TFDS data directory (runs: --config.data.tfds_data_dir); default "
                      "$TFDS_DATA_DIR or ~/tensorflow_datasets")
  parser.add_argument("--manual_dir", default="",
                      help="directory holding the already-downloaded archives under their "
                      "published names (cifar10: cifar-10-binary.tar.gz); nothing is downloaded")
  parser.add_argument("--download_dir", default="",
                      help="where downloads and extracted archives are kept; default "
                      "DATA_DIR/downloads")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    path, existed = prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir,
                            download_dir=args.download_dir)
  except PrepareError as e:
    fail(e)
  except ModuleNotFoundError as e:
    fail(f"{e}: install the pinned requirements (pip install -r requirements.txt)")
  print(f"{args.name}: {'already prepared' if existed else 'prepared'} in {path}")


if __name__ == "__main__":
  main()
