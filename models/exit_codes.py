"""Exit statuses of ``cttriage train``, ``evaluate`` and ``data``: what happened, for scripts and schedulers.

Kept free of torch so the command line's help can list them without loading the networks.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_NON_FINITE = 4

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_PARTIAL: "evaluate: some series failed (named and counted in the table); train: no checkpoint written",
    EXIT_USAGE: "usage, device or dataset layout error (nothing was trained or converted)",
    EXIT_DATA: "the data cannot train: one class in the classifier pool or validation set, more unreadable "
               "series than --max-skipped, nothing to train on (stopped before the first step)",
    EXIT_NON_FINITE: "a training loss or validation metric became NaN or infinite (stopped, the last good "
                     "checkpoint is kept)",
}


def exit_codes_help() -> str:
    """The table for ``--help`` epilogs."""
    return "exit status:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
