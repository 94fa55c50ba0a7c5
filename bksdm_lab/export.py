"""python -m bksdm_lab.export: Export a training checkpoint to a diffusers pipeline folder with a model card."""

from bksdm_lab.models.export import main

if __name__ == "__main__":
    main()
