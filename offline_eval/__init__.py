"""Offline evaluation: splits, metrics, baselines, reports (installed as ``apex_rank.offline_eval``)."""
