"""Subcommands of ``compress`` (``inspect``, ``bench``): each module registers one thin Typer command over a
public function; :mod:`compressor.commands.common` maps errors onto exit codes."""
