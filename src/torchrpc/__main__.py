"""``python -m torchrpc demo``: see :mod:`torchrpc.demo`."""
import sys

from .demo import main


def _cli() -> int:
    args = sys.argv[1:]
    if not args or args[0] != "demo":
        print("usage: python -m torchrpc demo [--workers N]", file=sys.stderr)
        return 2
    return main(args[1:])


if __name__ == "__main__":
    sys.exit(_cli())
