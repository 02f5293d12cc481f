"""The one exception a user sees as a sentence rather than a traceback."""

import sys


class UserError(Exception):
    """A mistake the user can fix: bad input, a missing dataset, a checkpoint that does not fit.

    Scripts print it as one line and exit with status 2. Bugs raise anything else and keep
    their traceback.
    """


def run_cli(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr and exit status 2, Ctrl-C exit status 130."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
