"""Datasets for GSV3D-PL: the headless mesh renderer, the Objaverse datamodule and the toy-object generator.

Configs reach these through ``class_path: datamodules.ObjaverseDataModule``; ``gsv3d_pl`` never imports them.

- ``mesh_io`` (mesh files -> normalised primitives), ``gl_context``, ``shaders`` and ``mesh_render`` (the renderer);
- ``mesh_header`` (face counts from a mesh file's header: ``max_faces`` before the parse);
- ``sources`` (which objects, which split), ``render_cache`` (objects rendered once into ``.npz`` files, checked and
  repaired), ``claims`` (two prepares on one cache share the work), ``latent_cache`` (VAE latents of the cached
  views), ``objaverse`` (the dataset and ``ObjaverseDataModule``);
- ``toy`` (procedural objects in the Objaverse cache layout).
"""

from datamodules.mesh_io import BadMeshError, MeshData, load_mesh
from datamodules.mesh_render import MeshRenderer, RenderOutput
from datamodules.objaverse import ObjaverseDataModule, ObjaverseViewsDataset
from datamodules.render_cache import read_cached_object
from datamodules.toy import generate_toy_objects

__all__ = ["BadMeshError", "MeshData", "MeshRenderer", "RenderOutput", "load_mesh", "ObjaverseDataModule",
           "ObjaverseViewsDataset", "read_cached_object", "generate_toy_objects"]
