"""python -m bksdm_lab.prepare: Cache VAE posteriors and token ids of a data set, for data=latents."""

from bksdm_lab.data.prepare import main

if __name__ == "__main__":
    main()
