"""Fuzz one target in this process: ``python3 -m fuzz.one TARGET [libFuzzer flags] [CORPUS_DIR]``.

atheris can set up only once per process, so ``fuzz.run`` starts one of these per target.
pyovpn is imported inside ``atheris.instrument_imports()`` so that libFuzzer sees its coverage.
An exception other than the target's expected errors ends the run with a crash file (libFuzzer's
``-artifact_prefix``) and a non-zero exit.
"""

from __future__ import annotations

import sys

import atheris


def main() -> None:
    name = sys.argv[1]
    with atheris.instrument_imports(include=["pyovpn"]):
        from fuzz import targets

        targets.setup()
    target = {**targets.TARGETS, **targets.HARNESS_CHECKS}[name]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
