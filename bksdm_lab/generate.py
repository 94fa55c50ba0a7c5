"""python -m bksdm_lab.generate: Generate images from a pipeline, a checkpoint or a teacher + student U-Net."""

from bksdm_lab.evaluation.sampling import main

if __name__ == "__main__":
    main()
