"""One flag style for every command-line tool of the project (the demo, `python -m jax_ep.info`,
`python -m jax_ep.bench`, the scripts under bench/): long flags are spelled with hyphens
(`--num-sms`), and the underscore spelling (`--num_sms`) is read as the same flag, so absl-style
command lines keep working; `--help` and the error messages show the hyphenated one."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


class FlagParser(argparse.ArgumentParser):
    """argparse.ArgumentParser (defaults shown in --help) that reads `--a_b` as `--a-b`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args([self._hyphenated(a) for a in argv], namespace)

    def _hyphenated(self, token: str) -> str:
        if not token.startswith("--") or "_" not in token:
            return token
        flag, eq, value = token.partition("=")
        spelled = "--" + flag[2:].replace("_", "-")
        return spelled + eq + value if spelled in self._option_string_actions else token
