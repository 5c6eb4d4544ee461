"""Failover drills: losing a region under load, measured and reported.

- `run`: the drill itself (DrillConfig, drill_lab, run_drill_async) on a lab;
- `workload`: the client payments through the geo router, and the lag sampler;
- `faults`: crashing, isolating and healing a region;
- `measure`: RTO, RPO, duplicates and disruption from what the workload saw;
- `report`: the terminal table, report.json, report.md and the timeline chart;
- `cli`: `paycluster drill planned|crash|partition`;
- `deploy`: the partition drill of a containerised deployment (`paycluster deploy drill`).
"""
