"""The refit simulator: one harness for every refit the project runs.

* :mod:`~mx_sim.refit.ranks`: the trainer and receiver rank bodies and the cycle check;
* :mod:`~mx_sim.refit.rig`: those ranks in one process (tests, benchmarks, conformance);
* :mod:`~mx_sim.refit.multiprocess`: one process per rank (``mx-sim run``);
* :mod:`~mx_sim.refit.planning`: planning only, for topologies too large to run;
* :mod:`~mx_sim.refit.torchrun`: one rank under torchrun;
* :mod:`~mx_sim.refit.faults`: every fault, one entry each;
* :mod:`~mx_sim.refit.matrix`: the CI matrix.
"""
