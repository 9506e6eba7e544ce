"""The bundle's own command line: ``python -m bundle <command> ...`` (see ``python -m bundle --help``)."""
