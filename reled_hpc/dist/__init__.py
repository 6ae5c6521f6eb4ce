"""Distribution: MPI ranks (mpi4py), buffer collectives, and the local `mpiexec` launcher."""
