"""Where ranks sit and how they start: topologies in Megatron's rank order
(:mod:`~mx_sim.cluster.topology`) and real rank processes with gloo groups and a TCPStore
(:mod:`~mx_sim.cluster.launch`)."""
