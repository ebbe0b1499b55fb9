"""``python -m vgs_kernels.testing README.md`` rewrites the README's families table; ``--coverage`` lists the
installed transformers' image-text-to-text families and what the spec table does with each."""
import sys

import transformers

from vgs_kernels.testing.coverage import coverage, update_readme


def _main(argv: list[str]) -> None:
    """``python -m vgs_kernels.testing README.md`` rewrites the families table; ``--coverage`` prints the
    installed transformers' image-text-to-text families and what the table does with each."""
    if argv == ["--coverage"]:
        cov = coverage()
        print(f"transformers {transformers.__version__}: {len(cov)} image-text-to-text model types")
        for status in ("tested", "covered", "lacks"):
            names = [m for m, s in cov.items() if s == status]
            print(f"{status} ({len(names)}): {' '.join(names)}")
    elif len(argv) == 1:
        update_readme(argv[0])
    else:
        raise SystemExit("usage: python -m vgs_kernels.testing README.md | --coverage")


if __name__ == "__main__":
    _main(sys.argv[1:])
