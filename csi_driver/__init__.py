"""csi-flashcopy: a CSI driver giving node-local volumes FlashCopy-style point-in-time copies."""

__version__ = "0.1.0"
DRIVER_NAME = "flashcopy.csi.dev"
