"""Stage 2, calibration: llama-imatrix's importance matrix from kquant's own forward pass.

- `imatrix`: the collector and the run over calibration text (`run_imatrix`, `compute_imatrix`);
- `imatrix_file`: the importance-matrix files (GGUF and legacy .dat), read, combined, written;
- `statistics`: llama-imatrix's --show-statistics tables and their plot.
"""
