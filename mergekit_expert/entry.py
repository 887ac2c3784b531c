"""``mergekit-expert`` console entry: ``export`` subcommand, else the merge CLI.

``mergekit-expert CONFIG OUT`` must keep working exactly as ``mergekit-yaml``
does, so the merge command stays a plain click command (a click group would
take CONFIG for a subcommand name); only a first argument that is literally
``export`` selects the export command. A config file named ``export`` is still
reachable as ``./export``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None):
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "export":
        from .export import main as export_main

        return export_main(args[1:], prog_name="mergekit-expert export")
    from .cli import main as merge_main

    return merge_main(args, prog_name="mergekit-expert")


if __name__ == "__main__":
    main()
