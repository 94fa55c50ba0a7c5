"""``data=world``: the image-folder data module over a world set, written first (``scenes.write_world``) if missing."""

from __future__ import annotations

from bksdm_lab.data.folder import FolderDataModule
from bksdm_lab.world.scenes import write_world


class WorldDataModule(FolderDataModule):
    """The folder data module; ``synthetic`` (num_images, seed, size) writes the set at ``root`` first, or checks that the
    set there was written with these parameters (any other folder is refused, never replaced)."""

    def __init__(self, root, *args, synthetic: dict | None = None, **kwargs):
        if synthetic:
            write_world(root, **synthetic)
        super().__init__(root, *args, **kwargs)
