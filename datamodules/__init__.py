"""Datasets for GSV3D-PL: the headless mesh renderer, the Objaverse datamodule and the toy-object generator.

Configs reach these through ``class_path: datamodules.ObjaverseDataModule``; ``gsv3d_pl`` never imports them.
"""

from datamodules.mesh_render import BadMeshError, MeshData, MeshRenderer, RenderOutput, load_mesh

__all__ = ["BadMeshError", "MeshData", "MeshRenderer", "RenderOutput", "load_mesh"]
from datamodules.objaverse import ObjaverseDataModule, ObjaverseViewsDataset, read_cached_object  # noqa: E402
from datamodules.toy import generate_toy_objects  # noqa: E402

__all__ += ["ObjaverseDataModule", "ObjaverseViewsDataset", "read_cached_object", "generate_toy_objects"]
