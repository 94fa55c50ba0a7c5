"""python -m bksdm_lab.bench: Benchmark a distillation step, the frozen parts and generation."""

from bksdm_lab.tools.bench import main

if __name__ == "__main__":
    main()
