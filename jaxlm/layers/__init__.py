"""Building blocks of the models. They know logical axis names, never meshes."""
