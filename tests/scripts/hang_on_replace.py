"""`python hang_on_replace.py run <recipe> ...`: the collapse-guard command line, except that the first rename
onto a path ending in $HANG_ON_REPLACE never happens. The process writes $HANG_MARKER and sleeps there, with
the temp file written and not yet renamed: the exact state a kill during an atomic write leaves behind, so a
test can SIGKILL it at that point every time instead of racing a microsecond window."""

import os
import sys
import time

_replace = os.replace


def _hanging_replace(src, dst, *args, **kwargs):
    target = os.environ.get("HANG_ON_REPLACE")
    if target and os.fspath(dst).endswith(target):
        with open(os.environ["HANG_MARKER"], "w") as fh:
            fh.write(os.fspath(src))
        time.sleep(3600)
    return _replace(src, dst, *args, **kwargs)


# only in a process started for it: pytest's doctest collection imports this file too, and must not hang
if os.environ.get("HANG_ON_REPLACE"):
    os.replace = _hanging_replace

if __name__ == "__main__":
    from collapse_guard.cli import main

    sys.exit(main(sys.argv[1:]))
