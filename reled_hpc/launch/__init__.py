"""Launching runs on SLURM (submitit or sbatch): submit, sweeps as job arrays, status."""
