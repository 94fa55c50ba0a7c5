"""python -m bksdm_lab.arch: Print parameter counts, MACs and the removed blocks of each variant."""

from bksdm_lab.models.report import main

if __name__ == "__main__":
    main()
