"""Callbacks that the package root installs into the core without the core importing the glue they call.

`HPARAMS_CREATED`: run, without arguments, after every `MoTEHyperParams` is constructed or loaded; `mote_plugin`
installs the EasyEdit glue's `register_with_host` there, so that a script naming only the class selects MoTE in an
importable host.

`LOADED_WITH`: the attribute the plugin's loader (`mote_plugin.loading`) sets on a model it loaded, {"dtype",
"device_map"}; `MoTEHyperParams` words its loading-flag warnings by it.
"""

HPARAMS_CREATED: list = []
LOADED_WITH = "_mote_loaded_with"
