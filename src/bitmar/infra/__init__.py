"""Run infrastructure shared by training, evaluation, analysis, export and the benchmarks, below all of them:
checkpoint files (`checkpoint`), the run logger (`run_logger`) and figure files (`figures`). Imports nothing of
BitMar but `bitmar.fileio`."""
