"""mx_sim: the simulator around mx_reference.

CPU mock backends, a simulated NIXL transport with fault injection, multi-rank topologies as
real processes (gloo groups, a TCPStore registry), the conformance plugin, benchmarks and the
``mx-sim`` CLI. Depends on mx_reference; never the reverse.
"""
