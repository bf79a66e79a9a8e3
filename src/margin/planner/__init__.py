"""The planner: catalogues (catalog), the roofline performance model (perf), its calibration
(calibrate), scenarios (scenario), their economics (economics) and plots (plots). See docs/planner.md.

The replay simulator and autoscaling advice import `margin.planner.perf` (step_time_s, throughput,
Deployment, Step, kv_capacity_tokens, ...) and `margin.planner.catalog` (models, gpus)."""
