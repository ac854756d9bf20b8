"""The per-GPU memory plan of docs/scaling.md (`plan`) and its calibration on the real code path (`calibrate`,
`measure`); used by scripts/memory_plan.py."""
