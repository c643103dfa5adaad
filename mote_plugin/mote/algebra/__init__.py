"""Pure tensor algebra of MoTE: functions of tensors only (no model, no hooks, no files). Solves run in float64."""
