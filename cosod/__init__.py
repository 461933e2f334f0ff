"""cosod: co-salient object detection on frozen ViT features (SCoSPARC, UMS-CoSOD).

A pure library: images in, masks out. Importing it loads no weights, touches no CUDA and imports nothing from
the web or queue stack (flask, rq, redis, label_studio_sdk).
"""

__version__ = "0.1.0"
