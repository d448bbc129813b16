"""What saelab tells the person running it, on stderr (stdout is left for results)."""

import sys


def say(message: str) -> None:
    print(f"saelab: {message}", file=sys.stderr, flush=True)
