"""The mesh's certificate authority: roots, workload and bootstrap certificates."""
