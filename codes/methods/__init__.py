"""The four anomaly detectors: Patch SVDD (codes/methods/patchsvdd.py, on its own trained encoder) and PSDL,
PaDiM and PatchCore (psdl.py, padim.py, patchcore.py, on a pre-trained ImageNet backbone; what those three
share is in backbone.py). Every fitted method is a `Detector` (base.py): evaluation, visualization, export,
prediction and the service score images through it without asking which method it is.

This module holds the names only, so that the flags (codes/cli.py) need no method code.
"""
NAMES = ('patchsvdd', 'psdl', 'padim', 'patchcore')
BACKBONE_METHODS = NAMES[1:]
TITLES = {'patchsvdd': 'Patch SVDD', 'psdl': 'PSDL', 'padim': 'PaDiM', 'patchcore': 'PatchCore'}
