"""How, never what: implementation choices that change speed and memory but not results
(attention kernels and layer loops, Pallas kernels, matmul precision, device meshes).
Each is checked against `core` by the tests; docs/performance.md gives the measured reasons."""
