"""The ``lobby`` command (and ``python -m lobby``). Ctrl-C while the command is still importing what it needs (half
a second on a cold start) ends it quietly, as it does later."""

import sys


def main() -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
