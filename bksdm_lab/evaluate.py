"""python -m bksdm_lab.evaluate: Evaluate a model with the paper's protocol (FID, IS, CLIP score)."""

from bksdm_lab.evaluation.evaluate import main

if __name__ == "__main__":
    main()
