"""``python -m audit.data.fetch [--download]``: make sure Fashion-MNIST is on this machine.

Exit 0 and print the directory when found; with ``--download`` fetch the official files
into the cache when they are not; otherwise exit 1 with the three ways to get them.
"""

from __future__ import annotations

import argparse
import sys

from audit.data.readers import DatasetMissing, fashion_mnist_dir
from audit.paths import cache_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--download", action="store_true", help="download the official files if missing")
    a = p.parse_args(argv)
    try:
        d = fashion_mnist_dir(download_to=cache_dir("fashion-mnist") if a.download else None)
    except DatasetMissing as e:
        print(e, file=sys.stderr)
        return 1
    print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
