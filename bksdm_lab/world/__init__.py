"""The CPU-scale world: procedural captioned scenes (``scenes``), the world's small teacher trained on CPU
(``teacher``, ``python -m bksdm_lab.world.teacher``) and its judge (``judge``). Importing the package loads nothing.
"""
