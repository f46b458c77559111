"""Operating FlashCopy: status of every copy, restore in place, incremental refresh of clones, copy rates.

`actions` checks and runs the operations over an api.Backend; `view` renders a Report (JSON, tables, progress
bars); `reconciler` runs them for the VolumeRestore and VolumeRefresh objects of a cluster on the leading
controller and publishes per-node status and Events; `commands` is the `status`, `restore` and `refresh` CLI.
"""
