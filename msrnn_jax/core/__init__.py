"""The paper: the fixed-shape state, the policies as eviction keys, the step and its
scans, the parallel forward and the prefill modes, and `reference`, the slow numpy
executable specification that the tests hold all of it to."""
