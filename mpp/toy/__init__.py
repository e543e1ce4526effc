"""The embedded toy world (DESIGN.md section 7): procedural scenes, a PCA patch codec standing in
for the VAE, and a bundle of tiny encoders/backbone of the real classes.

A leaf: the toy imports mpp's core, the core never imports the toy (but for the DataModule's
`data.toy` option, `mpp.toy.prepare.ToyData`). ``scenes`` needs numpy and pillow (and
`mpp.evaluate`'s box IoU), ``codec`` torch; the bundle is ``models``, its dataset ``prepare``.
"""

from .codec import PatchCodec
from .scenes import Identity, Scene, ToyInstance, ToyWorld

__all__ = ["Identity", "PatchCodec", "Scene", "ToyInstance", "ToyWorld"]
