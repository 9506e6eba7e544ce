"""Command-line helpers shared by the bundle's commands (python-fire)."""

from __future__ import annotations

from collections.abc import Sequence

HELP_FLAGS = ("help", "h")  # what python-fire hands a ``**kwargs`` function for ``--help`` / ``-h``


def print_help(func) -> None:
    """Print python-fire's help page of ``func`` (its docstring, arguments and defaults)."""
    from fire.helptext import HelpText

    print(HelpText(func))


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def multi_value_flags(argv: Sequence[str], rest: Sequence, flags: Sequence[str]) -> dict[str, list[str]]:
    """``{flag: [values]}`` for the ``flags`` given with several space-separated values on the command line.

    python-fire binds the first value to the flag and hands the others over as positional arguments (``rest``);
    they are regrouped from ``argv``. Raises ``TypeError`` when ``rest`` holds anything else (a stray positional
    argument)."""
    out: dict[str, list[str]] = {}
    flag = None
    for tok in list(argv):
        if tok.startswith("--"):
            name = tok[2:].split("=", 1)[0].replace("-", "_")
            flag = name if name in flags and "=" not in tok else None
            if flag:
                out[flag] = []
        elif flag:
            out[flag].append(tok)
    given = sorted(str(v) for vals in out.values() for v in vals[1:])
    rest_s = sorted(str(r) for r in rest)
    if given != rest_s and not (len(given) == len(rest_s) and all(_same(a, b) for a, b in zip(given, rest_s))):
        raise TypeError(
            f"unexpected positional arguments {list(rest)}; only {', '.join('--' + f for f in flags)} take several "
            "values."
        )
    return {k: v for k, v in out.items() if len(v) > 1}
