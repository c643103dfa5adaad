"""MoTE, the editor, in layers; a module imports only from layers above it in this list (tests/test_layout.py):

    algebra/            pure tensor maths, no model, no hooks: keys routed to experts (routed_keys, the type the
                        steps below pass keys in), Tucker factors (tucker, eig), null-space projectors (nullspace), the
                        basis a batch is solved in (batch_basis) and what it holds (coverage), the core solve
                        (core_solve), the baseline solvers (baselines) behind one interface (solvers, with LayerBasis),
                        and the update every solver writes (update)
    model/              what runs or hooks the model: edit requests (requests), the lookup token (lookup), the edited
                        MoE blocks and a forward that stops after them (blocks), activation hooks (hooks), key capture
                        and layer outputs (capture), preservation statistics (stats), v*
                        targets (vstar_objective, on a batch's rows from vstar_rows with the upper layers replayed
                        by vstar_replay, kept on disk by vstar_cache; host_compute_z: the EasyEdit host's own),
                        accelerate offload (offload), weight fingerprints (fingerprint), atomic file writes
                        (storage)
    hparams.py          MoTEHyperParams: the YAML keys, validated (a plain dataclass; `mote_plugin.register()` binds
                        it to the host's HyperParams)
    patches/history.py  what each edit changed, recorded per model for the patch files
    editor.py           MoTEEditor: one model's edits, step by step, and the state kept between them (EditState)
    mote_main.py        apply_mote_to_model / last_timings: EasyEdit's apply-function contract around the editor
    patches/files.py    edit patch files (save_edit / apply_edit / revert_edit / inspect_edit), from the editor's record

The family adapters (`mote_plugin.adapters`) sit beside `model/`: they compute `RoutedKeys`, and `model/` and the editor
use them. Nothing here imports `mote_plugin.metrics`, the experiments, the EasyEdit glue (`mote_plugin.easyedit`) or
the package root.
"""
