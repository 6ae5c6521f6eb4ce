"""Offline analysis of reled-hpc HDF5 dumps (`reled-hpc analyze ...`)."""
