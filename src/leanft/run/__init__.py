"""The run layer: config, the method registry, the Trainer and its callbacks, run folders, data and tasks,
evaluation, model loading. Imports the core, never ``leanft.studies``."""
